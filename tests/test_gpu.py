"""GPU-only checks (marker gpu): the Triton decode attention and the fast captioning path."""

import pytest
import torch

pytestmark = pytest.mark.gpu

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
@pytest.mark.parametrize("length, pos", [(53, 33), (53, 52), (17, 0)])
def test_decode_attention_kernel_matches_sdpa(length, pos):
    import torch.nn.functional as F

    from captune.ops.decode_attention import decode_attention

    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(64, 8, 1, 80, device="cuda", dtype=torch.bfloat16, generator=g) * 80**-0.5
    k = torch.randn(64, 8, length, 80, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(64, 8, length, 80, device="cuda", dtype=torch.bfloat16, generator=g)
    p = torch.tensor(pos, device="cuda")
    mask = (torch.arange(length, device="cuda") <= pos).view(1, 1, 1, -1)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, scale=1.0)
    out = decode_attention(q, k, v, p)
    assert (out.float() - ref).abs().max().item() < 2e-2


@needs_cuda
def test_fast_captions_match_generate_on_gpu():
    """The demo model in bf16 on the GPU: fast greedy path vs HF generate."""
    import dataclasses

    from captune.config import EvalConfig, ModelConfig
    from captune.demo import world
    from captune.model.load import load_model
    from captune.ops.features import image_features
    from captune.ops.generation import caption_features

    loaded = load_model(ModelConfig(device="cuda", dtype="bf16"))
    images = [it["image"] for it in world.make_items("plain", 64, seed=4)]
    feats = image_features(loaded.model, loaded.processor, images)
    slow = EvalConfig(batch_size=64, max_new_tokens=16, fast=False)
    a = caption_features(loaded.model, loaded.processor.tokenizer, feats, slow)
    b = caption_features(loaded.model, loaded.processor.tokenizer, feats, dataclasses.replace(slow, fast=True))
    agree = sum(x == y for x, y in zip(a, b, strict=True)) / len(a)
    assert agree >= 0.95, agree


@needs_cuda
def test_gpu_jpeg_decode_features_close_to_cpu_path():
    import io

    import torch.nn.functional as F
    from PIL import Image

    from captune.config import ModelConfig
    from captune.demo import world
    from captune.model.load import load_model
    from captune.ops import features as feat_mod

    loaded = load_model(ModelConfig(device="cuda", dtype="bf16"))
    jpegs = []
    for it in world.make_items("plain", 16, seed=6):
        buf = io.BytesIO()
        Image.open(io.BytesIO(it["image"])).convert("RGB").resize((320, 240)).save(buf, format="JPEG", quality=90)
        jpegs.append(buf.getvalue())
    gpu = feat_mod.image_features(loaded.model, loaded.processor, jpegs, batch_size=16)
    with torch.no_grad():
        pv = feat_mod.pixel_values(loaded.processor, jpegs).to("cuda", torch.bfloat16)
        cpu = loaded.model.get_image_features(pixel_values=pv, return_dict=True).pooler_output
    sim = F.cosine_similarity(gpu.float().flatten(1), cpu.float().flatten(1)).min().item()
    assert sim > 0.99, sim


@needs_cuda
def test_tf32_qformer_features_within_the_bf16_rounding_of_fp32_ones():
    """auto takes TF32 for the fp32 Q-Former of a bf16 model: its features stay within the bf16
    rounding the language model's input gets anyway."""
    from captune.config import ModelConfig
    from captune.demo import world
    from captune.model.load import load_model
    from captune.ops.features import image_features, set_qformer_matmul

    loaded = load_model(ModelConfig(device="cuda", dtype="bf16"))
    images = [it["image"] for it in world.make_items("plain", 64, seed=5)]
    set_qformer_matmul(loaded.model, "fp32")
    ref = image_features(loaded.model, loaded.processor, images).float()
    set_qformer_matmul(loaded.model, "auto")
    got = image_features(loaded.model, loaded.processor, images).float()
    ulp = ref.abs().clamp_min(1e-2) * 2**-7  # one bf16 step at each value's size
    assert ((got - ref).abs() <= 2 * ulp).float().mean() > 0.99
