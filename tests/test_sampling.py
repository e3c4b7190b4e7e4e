"""Sampled captions: the static-cache sampler equals a plain full-forward sampler with the same draws."""

import pytest
import torch

from captune.config import EvalConfig, ModelConfig
from captune.demo import world
from captune.model.load import load_model
from captune.ops.batching import generation_prompt
from captune.ops.fast_decode import SamplingOPT
from captune.ops.features import image_features
from captune.ops.generation import caption_features
from captune.ops.lm import embed_with_features, unwrap
from captune.ops.sampling import SamplingSpec, choose, draw, sample_captions, sequence_mask


@pytest.fixture(scope="module")
def demo():
    loaded = load_model(ModelConfig(device="cpu"))
    images = [it["image"] for it in world.make_items("catalog", 4, seed=5)]
    return loaded, image_features(loaded.model, loaded.processor, images)


def _prompt_embeds(blip, tok, feats, prompt=""):
    ids = generation_prompt(
        tok,
        feats.size(0),
        num_query_tokens=blip.config.num_query_tokens,
        image_token_id=blip.config.image_token_index,
        prompt=prompt,
    )
    return embed_with_features(blip, ids.input_ids.to(feats.device), feats)


@torch.no_grad()
def _reference(blip, embeds, spec, eos, pad, generator):
    """No cache: the HF model's full forward over prompt + sampled prefix at every step."""
    rows = embeds.repeat_interleave(spec.k, 0)
    lm = blip.language_model
    out, logits_seen = [], []
    done = torch.zeros(rows.size(0), dtype=torch.bool)
    prefix = rows
    for n in range(spec.max_new_tokens):
        logits = lm(inputs_embeds=prefix, attention_mask=torch.ones(prefix.shape[:2], dtype=torch.long)).logits[:, -1]
        logits_seen.append(logits.float())
        token = choose(logits, n, spec, eos, generator)
        token = torch.where(done, torch.full_like(token, pad), token)
        out.append(token)
        done |= token == eos
        prefix = torch.cat([prefix, lm.get_input_embeddings()(token).unsqueeze(1)], dim=1)
    return torch.stack(out, 1), torch.stack(logits_seen, 1)


@pytest.mark.parametrize(
    "spec",
    [
        SamplingSpec(k=3, max_new_tokens=12),
        SamplingSpec(k=2, max_new_tokens=10, min_new_tokens=6, temperature=1.7, top_k=30, top_p=0.9),
    ],
)
def test_sampler_equals_full_forward_reference(demo, spec):
    loaded, feats = demo
    blip, tok = unwrap(loaded.model), loaded.processor.tokenizer
    embeds = _prompt_embeds(blip, tok, feats)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    dec = SamplingOPT(blip.language_model, feats.size(0), spec.k, embeds.size(1), spec.max_new_tokens)
    g = torch.Generator().manual_seed(1)
    tokens, logits = dec.sample(
        embeds, lambda lg, n: choose(lg, n, spec, eos, g), eos_token_id=eos, pad_token_id=pad, keep_logits=True
    )
    ref_tokens, ref_logits = _reference(blip, embeds, spec, eos, pad, torch.Generator().manual_seed(1))
    steps = logits.size(1)  # the sampler stops once every row has ended (the rest is padding)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits[:, :steps], atol=1e-4, rtol=1e-4)
    assert len({tuple(r) for r in tokens.tolist()}) > feats.size(0)  # samples of one image differ
    if spec.min_new_tokens:
        assert not (tokens[:, : spec.min_new_tokens] == eos).any()


def test_temperature_zero_and_near_zero_are_greedy(demo):
    loaded, feats = demo
    tok = loaded.processor.tokenizer
    greedy = caption_features(loaded.model, tok, feats, EvalConfig(batch_size=4, max_new_tokens=12))
    exact = sample_captions(loaded.model, tok, feats, SamplingSpec(k=2, max_new_tokens=12, temperature=0))
    cold = sample_captions(
        loaded.model,
        tok,
        feats,
        SamplingSpec(k=2, max_new_tokens=12, temperature=1e-4),
        generator=torch.Generator().manual_seed(0),
    )
    doubled = [c for c in greedy for _ in range(2)]
    assert exact.captions == doubled
    assert cold.captions == doubled


def test_samples_are_reproducible_masked_and_reuse_one_decoder(demo):
    loaded, feats = demo
    tok = loaded.processor.tokenizer
    spec = SamplingSpec(k=4, max_new_tokens=15)
    decoders: dict = {}
    a = sample_captions(loaded.model, tok, feats, spec, generator=torch.Generator().manual_seed(3), decoders=decoders)
    b = sample_captions(loaded.model, tok, feats, spec, generator=torch.Generator().manual_seed(3), decoders=decoders)
    c = sample_captions(loaded.model, tok, feats, spec, generator=torch.Generator().manual_seed(4), decoders=decoders)
    assert len(decoders) == 1
    assert torch.equal(a.tokens, b.tokens) and a.captions == b.captions
    assert not torch.equal(a.tokens, c.tokens)
    assert a.tokens.shape == a.mask.shape == (feats.size(0) * 4, 15) and len(a.captions) == 16
    assert torch.equal(a.mask, sequence_mask(a.tokens, tok.eos_token_id))
    assert (a.tokens[~a.mask] == tok.pad_token_id).all()
    assert a.captions == [t.strip() for t in tok.batch_decode(a.tokens.tolist(), skip_special_tokens=True)]
    slow = sample_captions(loaded.model, tok, feats, spec, generator=torch.Generator().manual_seed(3), fast=False)
    assert slow.tokens.shape == a.tokens.shape  # the generate() path: same layout


def _draws_equal_multinomial(device: str) -> None:
    """``draw`` picks torch.multinomial's tokens from the same generator and leaves it in the same state."""
    for seed in range(8):
        for dtype in (torch.float32, torch.float64):
            gen = torch.Generator(device=device).manual_seed(seed)
            logits = torch.randn(9, 700, dtype=dtype, device=device, generator=gen) * 4
            logits[:, 300:] = float("-inf")  # a cut distribution (top-k / top-p): zeros are never drawn
            probs = torch.softmax(logits, -1)
            a, b = torch.Generator(device=device).manual_seed(seed), torch.Generator(device=device).manual_seed(seed)
            want = torch.multinomial(probs, 1, generator=a).squeeze(1)
            got = draw(probs, b)
            assert torch.equal(got, want) and torch.equal(a.get_state(), b.get_state())
            assert (got < 300).all()


def test_draw_is_torch_multinomial():
    _draws_equal_multinomial("cpu")


def test_sequence_mask_covers_up_to_the_first_eos():
    tokens = torch.tensor([[5, 2, 1, 1], [5, 6, 7, 8], [2, 2, 1, 1]])
    assert sequence_mask(tokens, 2).tolist() == [
        [True, True, False, False],
        [True, True, True, True],
        [True, False, False, False],
    ]


def test_encoder_decoder_samples_through_generate(tiny_t5_dir):
    loaded = load_model(ModelConfig(name_or_path=str(tiny_t5_dir), device="cpu"))
    tok = loaded.processor.tokenizer
    torch.manual_seed(0)
    feats = torch.randn(3, 4, 32)
    spec = SamplingSpec(k=3, max_new_tokens=8, temperature=3.0)  # the random tiny T5 is peaked
    a = sample_captions(loaded.model, tok, feats, spec, generator=torch.Generator().manual_seed(0))
    b = sample_captions(loaded.model, tok, feats, spec, generator=torch.Generator().manual_seed(0))
    assert a.tokens.shape == (9, 8) and torch.equal(a.tokens, b.tokens)
    assert len({tuple(r) for r in a.tokens.tolist()}) > 3
    assert (a.tokens[~a.mask] == tok.pad_token_id).all()
    greedy = caption_features(loaded.model, tok, feats, EvalConfig(batch_size=3, max_new_tokens=8))
    cold = sample_captions(loaded.model, tok, feats, SamplingSpec(k=1, max_new_tokens=8, temperature=0))
    assert cold.captions == greedy


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_sampler_equals_eager_and_reference():
    """On a GPU the step is a CUDA graph: same tokens as the eager step and the full-forward reference."""
    loaded = load_model(ModelConfig(device="cuda", dtype="fp32"))
    images = [it["image"] for it in world.make_items("catalog", 6, seed=5)]
    feats = image_features(loaded.model, loaded.processor, images)
    blip, tok = unwrap(loaded.model), loaded.processor.tokenizer
    embeds = _prompt_embeds(blip, tok, feats)  # the prompt's ids go to the model's device
    spec = SamplingSpec(k=5, max_new_tokens=14, top_p=0.95)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    out = []
    for graph in (True, False):
        dec = SamplingOPT(blip.language_model, 6, spec.k, embeds.size(1), spec.max_new_tokens, use_graph=graph)
        g = torch.Generator(device="cuda").manual_seed(2)
        for _ in range(2):  # the second call replays the captured graph
            tokens, _ = dec.sample(
                embeds, lambda lg, n, g=g: choose(lg, n, spec, eos, g), eos_token_id=eos, pad_token_id=pad
            )
        out.append(tokens)
        assert (dec.graph is not None) == graph
    assert torch.equal(out[0], out[1])
    g = torch.Generator(device="cuda").manual_seed(2)
    dec = SamplingOPT(blip.language_model, 6, spec.k, embeds.size(1), spec.max_new_tokens)
    tokens, _ = dec.sample(embeds, lambda lg, n: choose(lg, n, spec, eos, g), eos_token_id=eos, pad_token_id=pad)
    with torch.device("cuda"):
        ref, _ = _reference(blip, embeds, spec, eos, pad, torch.Generator(device="cuda").manual_seed(2))
    assert torch.equal(tokens, ref)
    _draws_equal_multinomial("cuda")  # the draw is torch.multinomial's on the GPU too


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_sampling_steps_never_wait_on_the_gpu():
    """Until min_new_tokens the decode loop (graph replay, token choice with top-k / top-p) makes no
    synchronising call: sync debug mode "error" raises on any (torch.multinomial's checks did)."""
    loaded = load_model(ModelConfig(device="cuda", dtype="fp32"))
    images = [it["image"] for it in world.make_items("catalog", 4, seed=5)]
    feats = image_features(loaded.model, loaded.processor, images)
    blip, tok = unwrap(loaded.model), loaded.processor.tokenizer
    embeds = _prompt_embeds(blip, tok, feats)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    spec = SamplingSpec(k=3, max_new_tokens=12, min_new_tokens=12, temperature=0.8, top_k=20, top_p=0.9)
    dec = SamplingOPT(blip.language_model, 4, spec.k, embeds.size(1), spec.max_new_tokens)
    g = torch.Generator(device="cuda").manual_seed(0)

    def run():
        return dec.sample(embeds, lambda lg, n: choose(lg, n, spec, eos, g), eos_token_id=eos, pad_token_id=pad,
                          min_new=spec.min_new_tokens)[0]  # fmt: skip

    first = run()  # captures the graph (capture synchronises)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        second = run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert second.shape == first.shape and not (second[:, : spec.min_new_tokens] == eos).any()
