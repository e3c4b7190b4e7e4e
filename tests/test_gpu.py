"""GPU-only checks (marker gpu): the Triton decode attention and the fast captioning path."""

import pytest
import torch

pytestmark = pytest.mark.gpu

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
@pytest.mark.parametrize(
    "shared, heads, warps, d", [(True, 1, 1, 80), (True, 4, 1, 80), (True, 2, 2, 128), (True, 8, 1, 64),
                                (False, 1, 1, 80), (False, 2, 1, 80), (False, 4, 1, 80), (False, 4, 1, 128),
                                (False, 8, 2, 80), (False, 4, 4, 64)],
)  # fmt: skip
@pytest.mark.parametrize(
    "rep, prompt, slot",
    [(1, 33, 0), (1, 33, 19), (5, 33, 7), (5, 33, 19), (5, 33, 0), (2, 17, 3), (3, 5, 9), (1, 1, 2)],
)
def test_decode_attention_kernel_matches_sdpa(rep, prompt, slot, shared, heads, warps, d, monkeypatch):
    """The Triton kernels against SDPA over the joined cache (the CPU path), prompt rows shared by
    ``rep`` sequences (``shared``: the kernel that reads each prompt row once for its ``rep``
    sequences, then the per-sequence kernel for the rest, else the per-sequence kernel alone; ``heads``
    heads of a sequence a program in ``warps`` warps: 4 and 1 are what ships); head dims ``d`` of 80
    (OPT-2.7b's), 128 and 64; the new token's key and value land in their slot."""
    from captune.ops import decode_attention as da
    from captune.ops.decode_attention import _reference, decode_attention

    monkeypatch.setattr(da, "SHARED", shared)
    monkeypatch.setattr(da, "HEADS", heads)
    monkeypatch.setattr(da, "HEADS_WARPS", warps)
    used = []

    class Spy:  # which per-sequence kernel ran
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            used.append(self.name)
            return self.kernel[grid]

    monkeypatch.setattr(da, "_decode_heads_kernel", Spy("heads", da._decode_heads_kernel))
    monkeypatch.setattr(da, "_decode_kernel", Spy("one", da._decode_kernel))

    g = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=g)

    b, h, new = 16 * rep, 8, 20
    q, k, v = randn(b, h, 1, d) * d**-0.5, randn(b, h, 1, d), randn(b, h, 1, d)
    kp, vp, kn, vn = (
        randn(b // rep, h, prompt, d),
        randn(b // rep, h, prompt, d),
        randn(b, h, new, d),
        randn(b, h, new, d),
    )
    pos = torch.tensor(prompt + slot, device="cuda")
    kn_ref, vn_ref = kn.clone(), vn.clone()
    ref = _reference(q.float(), k, v, kp.float(), vp.float(), kn_ref, vn_ref, pos, rep)
    out = decode_attention(q, k, v, kp, vp, kn, vn, pos)
    assert (out.float() - ref).abs().max().item() < 2e-2
    assert torch.equal(kn, kn_ref) and torch.equal(vn, vn_ref)
    assert used == ["heads" if heads > 1 else "one"]
    # q scaled by the kernel as it reads it: the same output, bit for bit, as q scaled by torch first
    raw = randn(b, h, 1, d)
    scaled = decode_attention(raw * d**-0.5, k, v, kp, vp, kn.clone(), vn.clone(), pos)
    assert torch.equal(decode_attention(raw, k, v, kp, vp, kn.clone(), vn.clone(), pos, d**-0.5), scaled)


@needs_cuda
@pytest.mark.parametrize(
    "t, d, dtype",
    [(33, 80, torch.bfloat16), (36, 80, torch.bfloat16), (9, 32, torch.bfloat16), (17, 64, torch.float16),
     (33, 80, torch.float16), (100, 128, torch.bfloat16), (33, 80, torch.float32), (1, 80, torch.bfloat16)],
)  # fmt: skip
def test_prefill_attention_kernel_matches_sdpa(t, d, dtype, monkeypatch):
    """The prefill's kernel (causal attention over the prompt rows, q scaled as it is read, the rows' keys
    and values written into the cache) against SDPA and the copies it replaces, and both against float64:
    rows laid out as the decoder's projections give them ((B, T, heads, D) viewed as (B, heads, T, D))."""
    from captune.ops import decode_attention as da

    g = torch.Generator(device="cuda").manual_seed(1)
    b, h, scale = 6, 8, d**-0.5
    x = torch.randn(b, t, 3, h, d, device="cuda", dtype=dtype, generator=g)
    q, k, v = (x[:, :, i].transpose(1, 2) for i in range(3))

    def cache():
        return torch.full((b, h, t, d), float("nan"), device="cuda", dtype=dtype)

    kp, vp, kp_ref, vp_ref = cache(), cache(), cache(), cache()
    with torch.no_grad():
        assert da.prefills(q, k, v, kp, vp)
        out = da.prefill_attention(q, k, v, kp, vp, scale)
        monkeypatch.setattr(da, "PREFILL", False)
        ref = da.prefill_attention(q, k, v, kp_ref, vp_ref, scale)
    assert torch.equal(kp, kp_ref) and torch.equal(vp, vp_ref)
    qs = (q * scale).double()
    scores = (qs @ k.double().transpose(-1, -2)).masked_fill(~torch.ones(t, t, device="cuda").tril().bool(), -1e300)
    exact = scores.softmax(-1) @ v.double()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (out.double() - exact).abs().max().item() < tol
    assert (out.double() - exact).abs().max().item() <= 2 * (ref.double() - exact).abs().max().item() + tol / 4


@needs_cuda
def test_graph_decoding_equals_eager_on_gpu():
    """The decode step captured after an eager first step, its logits read without a clone, over two
    generations (the second replays the graph from its first step): the tokens of every step run eagerly."""
    from captune.bench_targets import caption_prompt
    from captune.config import ModelConfig
    from captune.demo import world
    from captune.model.load import load_model
    from captune.ops.fast_decode import GreedyOPT
    from captune.ops.features import image_features

    loaded = load_model(ModelConfig(device="cuda", dtype="bf16"))
    images = [it["image"] for it in world.make_items("plain", 16, seed=5)]
    embeds = caption_prompt(loaded.model, image_features(loaded.model, loaded.processor, images), 16)
    lm, eos = loaded.model.language_model, loaded.processor.tokenizer.eos_token_id
    with torch.no_grad():
        eager = GreedyOPT(lm, 16, embeds.size(1), 12, use_graph=False)
        graphed = GreedyOPT(lm, 16, embeds.size(1), 12)
        want = eager.generate(embeds, eos_token_id=eos, pad_token_id=1, min_new=12)
        first = graphed.generate(embeds, eos_token_id=eos, pad_token_id=1, min_new=12)
        second = graphed.generate(embeds, eos_token_id=eos, pad_token_id=1, min_new=12)
    assert graphed.graph is not None
    assert torch.equal(first, want) and torch.equal(second, want)


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


def _demo_jpegs(n: int, seed: int) -> list[bytes]:
    """The demo world's scenes as 320x240 JPEGs (what nvJPEG decodes)."""
    import io

    from PIL import Image

    from captune.demo import world

    out = []
    for it in world.make_items("plain", n, seed=seed):
        buf = io.BytesIO()
        Image.open(io.BytesIO(it["image"])).convert("RGB").resize((320, 240)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


@needs_cuda
def test_gpu_jpeg_decode_features_close_to_cpu_path():
    import torch.nn.functional as F

    from captune.config import ModelConfig
    from captune.model.load import load_model
    from captune.ops import features as feat_mod

    loaded = load_model(ModelConfig(device="cuda", dtype="bf16"))
    jpegs = _demo_jpegs(16, seed=6)
    gpu = feat_mod.image_features(loaded.model, loaded.processor, jpegs, batch_size=16)
    with torch.no_grad():
        pv = feat_mod.pixel_values(loaded.processor, jpegs).to("cuda", torch.bfloat16)
        cpu = loaded.model.get_image_features(pixel_values=pv, return_dict=True).pooler_output
    sim = F.cosine_similarity(gpu.float().flatten(1), cpu.float().flatten(1)).min().item()
    assert sim > 0.99, sim


@needs_cuda
def test_side_stream_jpeg_decoding_gives_the_in_line_features():
    """Batches after the first are decoded on a side stream ahead of the model (_GpuDecoder); each
    must equal the same batch decoded in line (each 4-image call is one first batch)."""
    from captune.config import ModelConfig
    from captune.model.load import load_model
    from captune.ops import features as feat_mod

    loaded = load_model(ModelConfig(device="cuda", dtype="bf16"))
    jpegs = _demo_jpegs(24, seed=7)
    ahead = feat_mod.image_features(loaded.model, loaded.processor, jpegs, batch_size=4)
    in_line = [feat_mod.image_features(loaded.model, loaded.processor, jpegs[i : i + 4], batch_size=4)
               for i in range(0, 24, 4)]  # fmt: skip
    assert not feat_mod._GPU_DECODE_FAILED
    assert torch.equal(ahead, torch.cat(in_line))


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


@needs_cuda
def test_fused_vision_features_as_close_to_float32_ones_as_the_plain_modules():
    """auto fuses a bf16 vision tower on a GPU (GELU's tanh form in fc1's product, residual sums with
    their norms): its features are as close to the float32 model's (the checkpoint's modules, fp32
    Q-Former) as those of the checkpoint's modules in bf16."""
    from captune.config import ModelConfig
    from captune.demo import world
    from captune.model.load import load_model
    from captune.ops.features import image_features
    from captune.ops.vision import set_vision_kernels, vision_path

    images = [it["image"] for it in world.make_items("plain", 64, seed=5)]
    full = load_model(ModelConfig(device="cuda", dtype="fp32"))
    assert vision_path(full.model) == "the checkpoint's modules"
    ref = image_features(full.model, full.processor, images).float()
    loaded = load_model(ModelConfig(device="cuda", dtype="bf16"))
    assert vision_path(loaded.model) == "fc1 + GELU (tanh form) in one product, residual sum + layer norm in one pass"
    fused = image_features(loaded.model, loaded.processor, images).float()
    set_vision_kernels(loaded.model, "plain")
    plain = image_features(loaded.model, loaded.processor, images).float()
    assert not torch.equal(fused, plain)
    assert (fused - ref).abs().mean() <= 1.1 * (plain - ref).abs().mean()


@needs_cuda
def test_add_norm_kernel_is_torchs_sum_and_norm():
    """The Triton pass: the sum exactly torch's, the norm within one bf16 step of torch's (rows of 1408 as
    ViT-g's, and of 40 as the demo tower's)."""
    from captune.ops.vision import add_norm

    for cols in (1408, 40):
        torch.manual_seed(0)
        norm = torch.nn.LayerNorm(cols, device="cuda", dtype=torch.bfloat16)
        torch.nn.init.normal_(norm.weight)
        torch.nn.init.normal_(norm.bias)
        a = torch.randn(3, 257, cols, device="cuda", dtype=torch.bfloat16)
        h = 4 * torch.randn(3, 257, cols, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            s, x = add_norm(a, h, norm)
            ref = norm(a + h)
        assert torch.equal(s, a + h)
        step = ref.float().abs().clamp_min(2**-6) * 2**-7  # one bf16 step at each value's size
        assert ((x.float() - ref.float()).abs() <= step).all()
        assert (x == ref).float().mean() > 0.9


@needs_cuda
def test_16bit_lora_products_follow_peft_gradients_on_gpu(tiny_model_dir):
    """lora.compute=auto on a bf16 model: the adapter's gradients agree with peft's fp32 products
    to bf16 precision (cosine > 0.999 per tensor)."""
    from transformers import Blip2ForConditionalGeneration

    from captune.config import LoraConfig
    from captune.model.lora import attach_lora
    from captune.model.lora_compute import use_16bit_compute

    ids = torch.randint(4, 40, (8, 16), generator=torch.Generator().manual_seed(1)).cuda()
    grads = []
    for patch in (False, True):
        torch.manual_seed(0)
        model = Blip2ForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).cuda()
        model = attach_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
        if patch:
            assert use_16bit_compute(model) > 0
        model.base_model.model.language_model(input_ids=ids).logits.float().pow(2).mean().backward()
        grads.append({n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad})
    for name, ref in grads[0].items():
        cos = torch.nn.functional.cosine_similarity(ref.flatten(), grads[1][name].flatten(), dim=0)
        assert cos > 0.999, (name, float(cos))


@needs_cuda
def test_4bit_bf16_stream_follows_peft_fp32_preparation_on_gpu(tiny_model_dir):
    """A 4-bit NF4 model with lora.compute=auto keeps its embeddings, norms and LM head in bf16 (the
    residual stream too); with fp32 they are upcast as peft prepares k-bit models. The outputs and every
    adapter gradient agree to bf16 precision."""
    pytest.importorskip("bitsandbytes")
    from captune.config import LoraConfig, ModelConfig
    from captune.model.load import load_model
    from captune.model.lora import attach_lora
    from captune.model.lora_compute import use_16bit_compute

    ids = torch.randint(4, 40, (8, 16), generator=torch.Generator().manual_seed(1)).cuda()
    grads, outs, stream = [], [], []
    for compute in ("fp32", "auto"):
        torch.manual_seed(0)
        loaded = load_model(ModelConfig(name_or_path=str(tiny_model_dir), device="cuda", quantization="4bit"))
        model = attach_lora(loaded.model, LoraConfig(r=4, alpha=8, dropout=0.0, compute=compute))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1, generator=torch.Generator(device=p.device).manual_seed(len(name)))
        if compute == "auto":
            assert use_16bit_compute(model) > 0
        lm = model.base_model.model.language_model
        stream.append(lm.get_input_embeddings().weight.dtype)
        out = lm(input_ids=ids).logits.float()
        out.pow(2).mean().backward()
        outs.append(out.detach())
        grads.append({n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None})
    assert stream == [torch.float32, torch.bfloat16]
    assert (outs[0] - outs[1]).abs().max() <= 3e-2 * outs[0].abs().max()
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, ref in grads[0].items():
        cos = torch.nn.functional.cosine_similarity(ref.flatten(), grads[1][name].flatten(), dim=0)
        assert cos > 0.99, (name, float(cos))


@needs_cuda
def test_fused_feed_forward_equals_the_module_calls_on_gpu(monkeypatch):
    """blip2-opt-2.7b's feed-forward size in bf16: ReLU in fc1's epilogue gives the module calls' values (to one
    bf16 rounding of a differently ordered sum) and their input and bias gradients."""
    from captune.ops import mlp

    torch.manual_seed(0)
    layer = torch.nn.Module()
    layer.fc1 = torch.nn.Linear(2560, 10240, device="cuda", dtype=torch.bfloat16)
    layer.fc2 = torch.nn.Linear(10240, 2560, device="cuda", dtype=torch.bfloat16)
    layer.activation_fn = torch.nn.ReLU()
    for prm in (layer.fc1.weight, layer.fc2.weight, layer.fc2.bias):
        prm.requires_grad_(False)
    h = torch.randn(3, 700, 2560, device="cuda", dtype=torch.bfloat16)
    results = []
    for fused in (True, False):
        monkeypatch.setattr(mlp, "FUSED", fused)
        assert mlp.fuses(layer, h) == fused
        x = h.clone().requires_grad_()
        layer.fc1.bias.grad = None
        out = mlp.feed_forward(layer, x)
        out.float().pow(2).mean().backward()
        results.append((out.float(), x.grad.float(), layer.fc1.bias.grad.float()))
    for got, want in zip(*results, strict=True):
        assert (got - want).abs().max() <= 1e-2 * want.abs().max(), float((got - want).abs().max())


@needs_cuda
def test_16bit_lora_products_on_4bit_layers_follow_peft_gradients_on_gpu(tiny_model_dir):
    """A 4-bit NF4 model (bitsandbytes): the adapter's products in bf16 on bitsandbytes' own product
    (``LoraOnOutput``) give peft's fp32 path's outputs and gradients to bf16 precision."""
    pytest.importorskip("bitsandbytes")
    from captune.config import LoraConfig, ModelConfig
    from captune.model.load import load_model
    from captune.model.lora import attach_lora
    from captune.model.lora_compute import use_16bit_compute

    ids = torch.randint(4, 40, (8, 16), generator=torch.Generator().manual_seed(1)).cuda()
    grads, outs = [], []
    for patch in (False, True):
        torch.manual_seed(0)
        loaded = load_model(ModelConfig(name_or_path=str(tiny_model_dir), device="cuda", quantization="4bit"))
        model = attach_lora(loaded.model, LoraConfig(r=4, alpha=8, dropout=0.0))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1, generator=torch.Generator(device=p.device).manual_seed(len(name)))
        if patch:
            assert use_16bit_compute(model) > 0
        out = model.base_model.model.language_model(input_ids=ids).logits.float()
        out.pow(2).mean().backward()
        outs.append(out.detach())
        grads.append({n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None})
    assert (outs[0] - outs[1]).abs().max() <= 2e-2 * outs[0].abs().max()
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, ref in grads[0].items():
        cos = torch.nn.functional.cosine_similarity(ref.flatten(), grads[1][name].flatten(), dim=0)
        assert cos > 0.999, (name, float(cos))


@needs_cuda
def test_load_model_warms_tritons_install_key():
    """``load_model`` on a GPU leaves Triton's install key computed (by its background thread), so the
    first kernel launch after the load does not hash Triton's install on the path."""
    import threading

    triton_cache = pytest.importorskip("triton.runtime.cache")
    from captune.config import ModelConfig
    from captune.model.load import load_model

    triton_cache.triton_key.cache_clear()
    load_model(ModelConfig(device="cuda", dtype="bf16"))
    for t in threading.enumerate():
        if t.name == "captune-triton-key":
            t.join(timeout=60)
    assert triton_cache.triton_key.cache_info().currsize == 1
