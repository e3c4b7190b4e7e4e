"""The SCST objective: log-probs, baselines, the REINFORCE gradient and its masking."""

import pytest
import torch

from captune.config import ModelConfig
from captune.model.load import load_model
from captune.ops.batching import generation_prompt
from captune.ops.lm import embed_with_features, unwrap
from captune.ops.sampling import SamplingSpec, warp
from captune.ops.scst import (
    TokenLogprobs,
    advantages,
    baseline,
    kl_to_start,
    policy_loss,
    sequence_logprobs,
    statistics,
)

B, K, T = 2, 3, 6


def _setup(model_dir, seed=0):
    loaded = load_model(ModelConfig(name_or_path=str(model_dir), device="cpu"))
    model, tok = loaded.model, loaded.processor.tokenizer
    model.eval().double()  # no dropout (gradients still flow); float64 so sums in another order agree
    blip = unwrap(model)
    torch.manual_seed(seed)
    feats = torch.randn(B, blip.config.num_query_tokens, blip.language_model.config.hidden_size, dtype=torch.float64)
    prompt = generation_prompt(
        tok,
        B,
        num_query_tokens=blip.config.num_query_tokens,
        image_token_id=blip.config.image_token_index,
        seq2seq=not blip.config.use_decoder_only_language_model,
    )
    eos, pad = tok.eos_token_id, tok.pad_token_id
    tokens = torch.randint(4, len(tok), (B * K, T))
    tokens[0, 2] = eos  # ends early
    tokens[3, 0] = eos  # an empty caption: EOS only
    tokens[4, T - 1] = eos
    tokens[1, 1] = blip.config.image_token_index  # a sampled image token stays a token
    done = torch.cumsum((tokens == eos).long(), 1) - (tokens == eos).long()
    mask = done == 0
    tokens = tokens.masked_fill(~mask, pad)
    return model, blip, feats, prompt, tokens, mask


def _reference_logprob(blip, feats, prompt, tokens, row, t):
    """log p(tokens[row, t] | prompt, tokens[row, :t]) from the plain HF forward of that one prefix."""
    i = row // K
    ids = prompt.input_ids[i : i + 1]
    emb = embed_with_features(blip, ids, feats[i : i + 1])
    lm = blip.language_model
    if blip.config.use_decoder_only_language_model:
        emb = torch.cat([emb, blip.get_input_embeddings()(tokens[row : row + 1, :t])], dim=1)
        logits = lm(inputs_embeds=emb).logits[0, -1]
    else:
        start = torch.tensor([[lm.config.decoder_start_token_id]])
        dec = torch.cat([start, tokens[row : row + 1, :t]], dim=1)
        logits = lm(inputs_embeds=emb, attention_mask=prompt.attention_mask[i : i + 1], decoder_input_ids=dec).logits[
            0, -1
        ]
    return torch.log_softmax(logits, -1)


@pytest.fixture(params=["opt", "t5"])
def model_dir(request, tiny_model_dir, tiny_t5_dir):
    return tiny_model_dir if request.param == "opt" else tiny_t5_dir


def test_logprobs_and_entropy_equal_the_plain_forward(model_dir):
    model, blip, feats, prompt, tokens, mask = _setup(model_dir)
    with torch.no_grad():
        got = sequence_logprobs(model, feats, prompt.input_ids, prompt.attention_mask, tokens, mask, entropy=True)
        for row in range(B * K):
            for t in range(T):
                if not mask[row, t]:
                    assert got.logprobs[row, t] == 0 and got.entropy[row, t] == 0
                    continue
                ref = _reference_logprob(blip, feats, prompt, tokens, row, t)
                torch.testing.assert_close(got.logprobs[row, t], ref[tokens[row, t]], atol=1e-10, rtol=1e-10)
                torch.testing.assert_close(got.entropy[row, t], -(ref.exp() * ref).sum(), atol=1e-10, rtol=1e-10)


def test_logprobs_of_the_sampling_distribution(tiny_model_dir):
    """With the sampler's spec the log-probs are those of the tempered, top-k-cut distribution the
    tokens were drawn from (on-policy REINFORCE), renormalised, and the entropy stays finite."""
    model, blip, feats, prompt, tokens, mask = _setup(tiny_model_dir)
    ids, attn = prompt.input_ids, prompt.attention_mask
    with torch.no_grad():
        plain = sequence_logprobs(model, feats, ids, attn, tokens, mask)
        for spec in (SamplingSpec(k=K, temperature=0.4), SamplingSpec(k=K, temperature=0.7, top_k=5)):
            ref = sequence_logprobs(model, feats, ids, attn, tokens, mask, entropy=True, spec=spec)
            assert torch.isfinite(ref.entropy).all() and not torch.equal(ref.logprobs, plain.logprobs)
            for row in range(B * K):
                for t in range(int(mask[row].sum())):
                    lp = _reference_logprob(blip, feats, prompt, tokens, row, t)
                    want = torch.log_softmax(warp(lp.unsqueeze(0), 0, spec, eos_token_id=-1), -1)[0]
                    if spec.top_k and torch.isinf(want[tokens[row, t]]):
                        assert torch.isinf(ref.logprobs[row, t])  # a random token outside the top k
                        continue
                    torch.testing.assert_close(ref.logprobs[row, t], want[tokens[row, t]], atol=1e-10, rtol=1e-10)
    assert torch.allclose(sequence_logprobs(model, feats, ids, attn, tokens, mask, spec=SamplingSpec(k=K)).logprobs,
                          plain.logprobs)  # fmt: skip


@pytest.mark.parametrize("normalize", ["sequence", "token"])
def test_gradient_equals_hand_computed_reinforce(model_dir, normalize):
    """d loss = -(1/N) sum_i A_i sum_t d log p_it (sequence) or -(1/n_tokens) ... (token), each log p_it
    differentiated on its own through the plain HF forward."""
    model, blip, feats, prompt, tokens, mask = _setup(model_dir)
    params = list(blip.language_model.parameters())  # the features are cached: nothing else is used
    rewards = torch.rand(B, K, dtype=torch.float64) * 3
    adv = advantages(rewards, baseline(rewards))
    lp = sequence_logprobs(model, feats, prompt.input_ids, prompt.attention_mask, tokens, mask)
    got = torch.autograd.grad(policy_loss(lp, mask, adv, normalize=normalize), params, allow_unused=True)
    got = [torch.zeros_like(p) if g is None else g for p, g in zip(params, got, strict=True)]
    scale = B * K if normalize == "sequence" else int(mask.sum())
    want = [torch.zeros_like(p) for p in params]
    for row in range(B * K):
        for t in range(int(mask[row].sum())):
            logp = _reference_logprob(blip, feats, prompt, tokens, row, t)[tokens[row, t]]
            for w, g in zip(want, torch.autograd.grad(logp, params, allow_unused=True), strict=True):
                if g is not None:
                    w -= adv[row] * g / scale
    assert sum(float(g.abs().sum()) for g in got) > 0
    # T5's layer norm computes its variance in float32 even in a float64 model: a sum over positions taken
    # in another order then differs at float32 precision (gradients here are O(1))
    atol = 1e-12 if blip.config.use_decoder_only_language_model else 1e-6
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=atol, rtol=1e-9)


def test_padding_after_eos_gets_no_gradient(tiny_model_dir):
    model, blip, feats, prompt, tokens, mask = _setup(tiny_model_dir)
    params = list(blip.language_model.parameters())  # the features are cached: nothing else is used
    adv = torch.randn(B * K, dtype=torch.float64)

    def grads(toks):
        lp = sequence_logprobs(model, feats, prompt.input_ids, prompt.attention_mask, toks, mask, entropy=True)
        loss = policy_loss(lp, mask, adv, entropy_coef=0.1)
        return loss, torch.autograd.grad(loss, params, allow_unused=True)

    loss, g = grads(tokens)
    garbage = tokens.clone()
    garbage[~mask] = torch.randint(4, 50, (int((~mask).sum()),))  # anything after EOS
    loss2, g2 = grads(garbage)
    assert torch.equal(loss, loss2)
    assert any(a is not None for a in g)
    for a, b in zip(g, g2, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_baselines():
    rewards = torch.tensor([[1.0, 2.0, 6.0], [0.0, 0.0, 3.0]])
    base = baseline(rewards)
    assert torch.allclose(base, torch.tensor([[4.0, 3.5, 1.5], [1.5, 1.5, 0.0]]))
    adv = advantages(rewards, base)
    assert adv.shape == (6,)
    torch.manual_seed(0)
    many = torch.rand(50, 5, dtype=torch.float64) * 4
    assert advantages(many, baseline(many)).view(50, 5).sum(1).abs().max() < 1e-12
    greedy = baseline(rewards, "greedy", torch.tensor([2.0, 1.0]))
    assert torch.equal(greedy, torch.tensor([[2.0] * 3, [1.0] * 3]))
    with pytest.raises(ValueError):
        baseline(rewards[:, :1])
    with pytest.raises(ValueError):
        baseline(rewards, "greedy")


def test_kl_entropy_and_statistics():
    logp = torch.log(torch.tensor([[0.5, 0.25, 1.0], [0.1, 0.9, 0.9]]))
    mask = torch.tensor([[True, True, False], [True, True, True]])
    assert torch.equal(kl_to_start(logp, logp, mask), torch.zeros_like(logp))
    start = torch.log(torch.tensor([[0.4, 0.5, 0.2], [0.2, 0.8, 0.9]]))
    kl = kl_to_start(logp, start, mask)
    assert (kl[mask] > 0).sum() == 4 and kl[0, 2] == 0
    entropy = torch.tensor([[1.0, 2.0, 9.0], [3.0, 4.0, 5.0]])
    tok = TokenLogprobs(logp, entropy)
    adv = torch.tensor([1.0, -1.0])
    plain = policy_loss(tok, mask, adv)
    assert torch.isclose(plain, -(adv * (logp * mask).sum(1)).mean())
    assert torch.isclose(policy_loss(tok, mask, adv, entropy_coef=0.5), plain - 0.5 * 15.0 / 5)
    assert torch.isclose(policy_loss(tok, mask, adv, kl=kl, kl_coef=2.0), plain + 2.0 * kl[mask].sum() / 5)
    rewards = torch.tensor([[1.0, 3.0]])
    stats = statistics(rewards, baseline(rewards), mask, tok, kl)
    assert stats["reward_mean"] == 2.0 and stats["baseline_mean"] == 2.0 and stats["advantage_std"] == 2.0
    assert stats["caption_length_mean"] == 2.5 and stats["entropy_mean"] == 3.0


def test_one_scst_step_from_the_parts_trains_only_lora():
    """Sample -> CIDEr-D reward -> baseline -> loss -> AdamW, on the demo model with LoRA."""
    import numpy as np

    from captune.config import LoraConfig
    from captune.demo import world
    from captune.evaluation.cider import CiderD
    from captune.model.lora import attach_lora
    from captune.ops.features import image_features
    from captune.ops.sampling import SamplingSpec, sample_captions

    loaded = load_model(ModelConfig(device="cpu"))
    items = world.make_items("plain", 4, seed=2)
    feats = image_features(loaded.model, loaded.processor, [it["image"] for it in items])
    scorer = CiderD([it["captions"] for it in items])
    torch.manual_seed(0)
    model = attach_lora(loaded.model, LoraConfig(target_modules="all-linear"))
    blip, tok = unwrap(model), loaded.processor.tokenizer
    prompt = generation_prompt(
        tok, 4, num_query_tokens=blip.config.num_query_tokens, image_token_id=blip.config.image_token_index
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.eval()
    samples = sample_captions(model, tok, feats, SamplingSpec(k=3, max_new_tokens=12), generator=torch.Generator())
    rewards = torch.tensor(scorer.score(samples.captions, np.repeat(np.arange(4), 3)), dtype=torch.float32).view(4, 3)
    assert rewards.max() > 0  # the demo model's plain captions share n-grams with the references
    model.train()
    base = baseline(rewards)
    lp = sequence_logprobs(model, feats, prompt.input_ids, prompt.attention_mask, samples.tokens, samples.mask)
    policy_loss(lp, samples.mask, advantages(rewards, base)).backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and all("lora_" in n for n in changed)
    stats = statistics(rewards, base, samples.mask)
    assert float(stats["caption_length_mean"]) == float(samples.mask.sum(1).float().mean())


def _lora_setup(model_dir, prompt="a photo of"):
    """The tiny model with a LoRA adapter (random B, so it acts), float64, eval; a prompt after BOS."""
    from captune.config import LoraConfig
    from captune.model.lora import attach_lora

    loaded = load_model(ModelConfig(name_or_path=str(model_dir), device="cpu"))
    torch.manual_seed(1)
    model = attach_lora(loaded.model, LoraConfig(target_modules="all-linear"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    model.eval().double()
    _, blip, feats, _, tokens, mask = _setup(model_dir)  # the same tokens, EOS-masked rows included
    tok = load_model(ModelConfig(name_or_path=str(model_dir), device="cpu")).processor.tokenizer
    ids = generation_prompt(
        tok,
        B,
        num_query_tokens=blip.config.num_query_tokens,
        image_token_id=blip.config.image_token_index,
        prompt=prompt,
        seq2seq=not blip.config.use_decoder_only_language_model,
    )
    return model, feats, ids, tokens, mask


def _values_and_grads(model, feats, ids, tokens, mask, **kw):
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    out = sequence_logprobs(model, feats, ids.input_ids, ids.attention_mask, tokens, mask, entropy=True, **kw)
    adv = torch.linspace(-1, 1, tokens.size(0), dtype=torch.float64)
    loss = policy_loss(out, mask, adv, entropy_coef=0.3)
    return out, torch.autograd.grad(loss, params)


@pytest.mark.parametrize("spec", [None, SamplingSpec(k=K, temperature=0.7, top_k=40)])
def test_packed_logprobs_and_lora_gradients_equal_the_unpacked(tiny_model_dir, spec, monkeypatch):
    """Each image's prefix (image tokens + prompt) once with its K samples packed after it: the same
    log-probs, entropies and LoRA gradients as K copies of the prefix, also when the vocabulary
    projection is taken 1 or 4 rows at a time."""
    from captune.ops.scst import packs_samples

    model, feats, ids, tokens, mask = _lora_setup(tiny_model_dir)
    assert ids.input_ids.size(1) > unwrap(model).config.num_query_tokens + 1  # the prompt is in the prefix
    assert packs_samples(model, ids.attention_mask)
    ref, ref_grads = _values_and_grads(model, feats, ids, tokens, mask, spec=spec, pack=False)
    assert all(float(g.abs().sum()) > 0 for g in ref_grads)
    assert (~mask).any() and mask.sum(1).min() == 1  # padded rows, and a row that is EOS alone
    from captune.ops import scst as ops

    vocab = unwrap(model).language_model.config.vocab_size
    for chunk in (None, 1, 4):
        if chunk:
            monkeypatch.setattr(ops, "LOGIT_CHUNK_ELEMENTS", chunk * vocab)
        got, grads = _values_and_grads(model, feats, ids, tokens, mask, spec=spec, pack=True)
        finite = torch.isfinite(ref.logprobs)
        assert torch.equal(finite, torch.isfinite(got.logprobs)) and (got.logprobs[~mask] == 0).all()
        torch.testing.assert_close(got.logprobs[finite], ref.logprobs[finite], atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(got.entropy, ref.entropy, atol=1e-12, rtol=1e-12)
        for g, r in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g, r, atol=1e-12, rtol=1e-10)


def test_models_that_cannot_pack_take_the_unpacked_path(tiny_model_dir, tiny_t5_dir):
    from captune.ops.scst import packs_samples

    t5, _, t5_ids, _, _ = _lora_setup(tiny_t5_dir)
    assert not packs_samples(t5, t5_ids.attention_mask)  # encoder-decoder
    model, _, ids, _, _ = _lora_setup(tiny_model_dir)
    padded = ids.attention_mask.clone()
    padded[0, 0] = 0  # a left-padded prompt: positions would differ per image
    assert packs_samples(model, ids.attention_mask) and not packs_samples(model, padded)
    decoder = unwrap(model).language_model.model.decoder
    saved = decoder.embed_positions
    del decoder.embed_positions  # no learned absolute positions: not an OPT decoder
    try:
        assert not packs_samples(model, ids.attention_mask)
    finally:
        decoder.embed_positions = saved


@pytest.mark.parametrize("pack", [True, False])
def test_no_vocabulary_sized_tensor_is_kept_for_the_backward(tiny_model_dir, pack, monkeypatch):
    """The logits of the sampled positions are recomputed chunk by chunk in the backward: nothing as
    wide as the vocabulary is saved by the forward (it was rows x vocab in float32, several times)."""
    model, feats, ids, tokens, mask = _lora_setup(tiny_model_dir)
    vocab = unwrap(model).language_model.config.vocab_size
    from captune.ops import scst as ops

    monkeypatch.setattr(ops, "LOGIT_CHUNK_ELEMENTS", 3 * vocab)
    saved = []

    def pack_hook(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
        out = sequence_logprobs(model, feats, ids.input_ids, ids.attention_mask, tokens, mask, entropy=True,
                                pack=pack)  # fmt: skip
    assert saved and not [s for s in saved if vocab in s]
    out.logprobs.sum().backward()  # and the recomputation gives gradients
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.slow  # ~30 s: two subprocesses
@pytest.mark.parametrize("flag, path", [([], "packed"), (["--no-pack"], "unpacked")])
def test_the_scst_step_benchmark_runs_tiny_on_the_cpu(tmp_path, flag, path):
    """bench/scst_step.py --tiny: the GPU benchmark's step on the CPU demo model, each size timed, the
    log-prob path it ran recorded."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "scst.json"
    env = dict(os.environ, PYTHONPATH=str(root / "src"), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(root / "bench" / "scst_step.py"), "--tiny", *flag, "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert [r["images_per_step"] for r in result["runs"]] == [2, 4]
    for run in result["runs"]:
        assert run["logprob_path"] == path and run["scst_images_per_s"] > 0
        assert set(run["median_s"]) == {"sample", "reward", "after_sampling", "step"}
        assert run["reward"] == "while the policy forward runs"
    assert result["scst_images_per_s"] == max(r["scst_images_per_s"] for r in result["runs"])


def test_advantages_make_the_rewards_only_when_asked(tiny_model_dir):
    """``training.rewards``: the sampled rows are copied to the CPU when drawn, but decoded and scored
    only when the loss asks for the advantages; then the rewards, the mean-of-others baseline and the
    advantages are those of the plain functions, made once."""
    import numpy as np

    from captune.demo import world
    from captune.evaluation.cider import CiderD
    from captune.ops.sampling import decode_samples
    from captune.training.rewards import Advantages, Drawn, Rewards

    model, blip, feats, prompt, tokens, mask = _setup(tiny_model_dir)
    tok = load_model(ModelConfig(name_or_path=str(tiny_model_dir), device="cpu")).processor.tokenizer
    scorer = CiderD([it["captions"] for it in world.make_items("plain", B, seed=1)])
    calls = []
    score = scorer.score
    scorer.score = lambda c, i: calls.append(1) or score(c, i)
    drawn = Drawn(tokens, mask)
    assert torch.equal(drawn.positions, mask.flatten().nonzero().squeeze(1))
    images = np.repeat(np.arange(B), K)
    adv = Advantages(Rewards(scorer, tok, blip, "").later(drawn.tokens, images), None, (B, K), "mean_others", "cpu")
    assert not calls  # nothing scored yet
    values = adv()
    rewards = torch.tensor(score(decode_samples(tok, tokens, "", blip), images), dtype=torch.float32).view(B, K)
    assert torch.equal(adv.rewards, rewards)
    assert torch.equal(values, advantages(rewards, baseline(rewards)))
    assert adv() is values and len(calls) == 1  # asked again: nothing recomputed


def test_the_policy_forward_is_queued_before_the_rewards_are_made(tiny_model_dir, monkeypatch):
    """The SCST loss module runs the teacher-forced forward first and only then asks for the advantages
    (whose rewards are made then, on the CPU, while the GPU computes); the given sampled positions give
    the same loss as finding them."""
    from captune.config import Config
    from captune.training import scst as trainer

    model, blip, feats, prompt, tokens, mask = _setup(tiny_model_dir)
    order = []
    real = trainer.sequence_logprobs

    def logprobs(*args, **kwargs):
        order.append("forward")
        return real(*args, **kwargs)

    def adv():
        order.append("advantages")
        return torch.linspace(-1, 1, B * K, dtype=torch.float64)

    monkeypatch.setattr(trainer, "sequence_logprobs", logprobs)
    rl = Config().rl
    positions = mask.flatten().nonzero().squeeze(1)
    loss = trainer.PolicyLoss(model, rl, pack=True)(feats, prompt.input_ids, prompt.attention_mask, tokens, mask, adv,
                                                    None, positions)  # fmt: skip
    assert order == ["forward", "advantages"]
    expected = policy_loss(real(model, feats, prompt.input_ids, prompt.attention_mask, tokens, mask,
                                spec=trainer.sampler_spec(rl)), mask, adv())  # fmt: skip
    assert torch.equal(loss, expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_packed_policy_forward_never_waits_on_the_gpu():
    """Given the sampled positions and the prompt on the CPU, the packed ``sequence_logprobs`` (SCST's
    on OPT) makes no synchronising call (sync debug mode "error" raises on any), so the CPU makes the
    rewards while the GPU runs it; its log-probs equal those of the path that finds the positions
    itself. (The unpacked path runs HF's forward, whose mask preparation waits.)"""
    from captune.training.rewards import Drawn

    loaded = load_model(ModelConfig(device="cuda", dtype="fp32"))
    model, tok = loaded.model, loaded.processor.tokenizer
    model.eval()
    blip = unwrap(model)
    g = torch.Generator(device="cuda").manual_seed(0)
    feats = torch.randn(3, blip.config.num_query_tokens, blip.language_model.config.hidden_size, device="cuda",
                        generator=g)  # fmt: skip
    prompt = generation_prompt(tok, 3, num_query_tokens=blip.config.num_query_tokens,
                               image_token_id=blip.config.image_token_index)  # fmt: skip
    tokens = torch.randint(4, len(tok), (3 * K, T), device="cuda", generator=g)
    tokens[1, 2] = tok.eos_token_id
    done = torch.cumsum((tokens == tok.eos_token_id).long(), 1) - (tokens == tok.eos_token_id).long()
    mask = done == 0
    tokens = tokens.masked_fill(~mask, tok.pad_token_id)
    drawn = Drawn(tokens, mask)

    def run(**kw):
        return sequence_logprobs(model, feats, prompt.input_ids, prompt.attention_mask, tokens, mask, **kw)

    run(positions=drawn.positions)  # warm-up (lazy initialisation may synchronise)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = run(positions=drawn.positions)
        out.logprobs.sum()  # queued: no wait either
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.allclose(out.logprobs, run().logprobs)
