"""The SCST phase: its config, its loop (reward, resume), the phase switch and the run folder."""

import json

import pytest
import torch

from captune.config import Config, ConfigError, load_config
from captune.data.prepare import Example
from captune.demo import world
from captune.errors import UserError
from captune.evaluation.cider import CiderD
from captune.model.load import load_model
from captune.model.lora import attach_lora
from captune.training.scst import check_scst_engine, train_scst


def _examples(n, seed, style="plain"):
    return [Example(it["image_id"], it["image"], it["captions"]) for it in world.make_items(style, n, seed=seed)]


def _cfg(**rl):
    cfg = Config()
    cfg.model.device = "cpu"
    cfg.lora.target_modules = "all-linear"
    cfg.eval.max_new_tokens = 12
    cfg.rl.enabled = True
    cfg.rl.samples, cfg.rl.max_new_tokens, cfg.rl.log_every = 4, 12, 1
    for k, v in rl.items():
        setattr(cfg.rl, k, v)
    return cfg


def _cider(captions, refs):
    """Validation CIDEr-D without Java (the fast scorer equals pycocoevalcap's)."""
    return float(CiderD(refs).score(captions, list(range(len(captions)))).mean())


def _scst(cfg, train_ex, val_ex, **kw):
    loaded = load_model(cfg.model)
    torch.manual_seed(0)
    model = attach_lora(loaded.model, cfg.lora)
    result = train_scst(model, loaded.processor, train_ex, val_ex, cfg, log=lambda m: None, score_fn=_cider, **kw)
    return result, {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def _scst_on_itself(cfg, train_ex, tmp_path):
    """SCST on ``train_ex`` validated on themselves: (model, its LoRA weights before, result, log path)."""
    loaded = load_model(cfg.model)
    torch.manual_seed(0)
    model = attach_lora(loaded.model, cfg.lora)
    start = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    log = tmp_path / "scst.jsonl"
    result = train_scst(model, loaded.processor, train_ex, train_ex, cfg, log=lambda m: None, score_fn=_cider,
                        log_path=log)  # fmt: skip
    return model, start, result, log


def test_rl_config_is_off_by_default_and_checked():
    assert Config().rl.enabled is False
    assert load_config("demo-scst").rl.enabled is True
    for bad in ("rl.temperature=0", "rl.samples=1", "rl.top_p=0", "rl.lr=0", "rl.batch_size=0"):
        with pytest.raises(ConfigError, match="^rl\\."):
            load_config("demo", [bad])
    assert load_config("demo", ["rl.samples=1", "rl.baseline=greedy"]).rl.samples == 1


def test_engines_scst_cannot_run_on_are_one_line():
    cfg = Config()
    for kind in ("fsdp", "zero2", "zero3"):
        cfg.train.distributed = kind
        with pytest.raises(UserError, match=f"not {kind}"):
            check_scst_engine(cfg, distributed=True)
    cfg.train.distributed = "ddp"
    check_scst_engine(cfg, distributed=True)


@pytest.mark.slow  # ~60 s on 2 busy cores
def test_scst_steps_train_lora_and_log_their_rows(tmp_path):
    """Six SCST steps on the same 8 images: one scst row per step, only LoRA weights change, and the
    last step is validated."""
    train_ex = _examples(8, 1)
    cfg = _cfg(lr=1e-3, batch_size=8, epochs=6, validate_every=0, select="last")
    model, start, result, log = _scst_on_itself(cfg, train_ex, tmp_path)
    rows = [json.loads(x) for x in log.read_text().splitlines()]
    steps = [r for r in rows if r["type"] == "scst"]
    assert [r["step"] for r in steps] == list(range(1, 7)) and result.steps == 6
    for key in ("reward", "baseline", "advantage_std", "caption_length", "lr", "loss"):
        assert all(isinstance(r[key], float) for r in steps), key
    # mean-of-others baseline: the mean baseline equals the mean reward
    assert all(r["baseline"] == pytest.approx(r["reward"], abs=1e-5) for r in steps)
    assert any(r["advantage_std"] > 0 for r in steps)
    changed = [k for k, v in model.named_parameters() if v.requires_grad and not torch.equal(v, start[k])]
    assert changed and all("lora_" in k for k in changed)
    val = [r for r in rows if r["type"] == "validation"]
    assert val and val[-1]["step"] == 6


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_scst_steps_on_a_gpu(tmp_path):
    """The trainer on a GPU: the samples copied out once drawn, the policy forward queued with the sampled
    positions, the rewards made meanwhile; each step logged, only LoRA weights changed."""
    train_ex = _examples(8, 1)
    cfg = _cfg(lr=1e-3, batch_size=4, epochs=1, validate_every=0, select="last")
    cfg.model.device = "cuda"
    model, start, result, log = _scst_on_itself(cfg, train_ex, tmp_path)
    steps = [json.loads(x) for x in log.read_text().splitlines() if '"scst"' in x]
    assert [r["step"] for r in steps] == [1, 2] and result.steps == 2
    assert all(r["baseline"] == pytest.approx(r["reward"], abs=1e-5) and r["reward"] >= 0 for r in steps)
    changed = [k for k, v in model.named_parameters() if v.requires_grad and not torch.equal(v, start[k])]
    assert changed and all("lora_" in k for k in changed)


def test_the_greedy_baseline_is_the_greedy_captions_reward(tmp_path):
    """rl.baseline=greedy: each image's baseline is the CIDEr-D of its greedy caption under the policy that
    sampled (on the first step, the starting adapter), against its references in the training corpus."""
    import numpy as np

    from captune.ops.features import image_features
    from captune.ops.sampling import SamplingSpec, sample_captions

    train_ex = _examples(6, 2)
    cfg = _cfg(lr=1e-3, batch_size=6, max_steps=1, epochs=0, validate_every=0, select="last", baseline="greedy",
               samples=2)  # fmt: skip
    loaded = load_model(cfg.model)
    torch.manual_seed(0)
    model = attach_lora(loaded.model, cfg.lora)
    model.eval()
    feats = image_features(model, loaded.processor, [e.image for e in train_ex])
    spec = SamplingSpec(k=1, max_new_tokens=cfg.rl.max_new_tokens, temperature=0)
    greedy = sample_captions(model, loaded.processor.tokenizer, feats, spec, prompt=cfg.model.prompt)
    want = CiderD([e.captions for e in train_ex]).score(greedy.captions, np.arange(6)).mean()
    log = tmp_path / "scst.jsonl"
    train_scst(model, loaded.processor, train_ex, [], cfg, log=lambda m: None, score_fn=_cider, log_path=log)
    (row,) = [json.loads(x) for x in log.read_text().splitlines() if '"scst"' in x]
    assert want > 0 and row["baseline"] == pytest.approx(want, rel=1e-5)
    assert row["reward"] != pytest.approx(want, rel=1e-3)  # the samples score otherwise: a real check


class Interrupt(Exception):
    pass


@pytest.mark.slow  # ~40 s on 2 busy cores
@pytest.mark.parametrize("stop_at, every", [(2, 1), (3, 0)])
def test_scst_resume_equals_uninterrupted(tmp_path, stop_at, every):
    """Killed after step ``stop_at`` (resumed mid-epoch 1 with every=1, from the end of epoch 1 with every=0),
    then resumed: the adapter (the best kept by validation CIDEr) is the uninterrupted one's."""
    train_ex, val_ex = _examples(8, 3), _examples(4, 4)
    cfg = _cfg(lr=1e-3, batch_size=4, epochs=2, checkpoint_every=every)
    full, full_state = _scst(cfg, train_ex, val_ex)

    def stop(step):
        if step == stop_at:
            raise Interrupt

    ckpt, log = tmp_path / "ckpt", tmp_path / "scst.jsonl"
    with pytest.raises(Interrupt):
        _scst(cfg, train_ex, val_ex, checkpoint_dir=ckpt, on_step=stop, log_path=log)
    assert any(ckpt.glob("step-*/state.json"))
    resumed, state = _scst(cfg, train_ex, val_ex, checkpoint_dir=ckpt, log_path=log)
    assert resumed.steps == full.steps == 4 and resumed.best_step == full.best_step
    assert all(torch.equal(state[k], full_state[k]) for k in full_state)
    logged = [json.loads(x) for x in log.read_text().splitlines()]
    # per kind of row: a validation scored in the background lands among the step rows when its score is in
    for kind in ("scst", "validation"):
        assert [r["step"] for r in logged if r["type"] == kind] == [
            r["step"] for r in full.history if r["type"] == kind
        ]
    assert [r["reward"] for r in logged if r["type"] == "scst"] == [
        r["reward"] for r in full.history if r["type"] == "scst"
    ]


def _ddp_cfg(normalize):
    # 3 images a step over 2 processes: shares of 2 and 1 images, so a wrong weighting of the
    # processes' gradients changes the step's direction (Adam's first step hides a common scale)
    return _cfg(lr=1e-2, batch_size=3, max_steps=1, epochs=0, select="last", validate_every=0, normalize=normalize,
                samples=3, max_new_tokens=8, temperature=0.7)  # fmt: skip


def _scst_process(rank: int, port: int, normalize: str, out) -> None:
    import os

    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
    )  # fmt: skip
    torch.set_num_threads(1)
    from captune.distributed import barrier, close

    cfg = _ddp_cfg(normalize)
    result, state = _scst(cfg, _examples(3, 5), [], log_path=out / "scst.jsonl")
    torch.save({"state": state, "steps": result.steps}, out / f"rank{rank}.pt")
    barrier()
    close()


def _one_process_on_both_shares(cfg, train_ex):
    """What the 2-process step should be: one step on the union of the two processes' samples (each
    drawn with its process's generator), computed here from the ops alone."""
    import random

    import numpy as np

    from captune.data.pairs import rank_share
    from captune.ops.batching import generation_prompt
    from captune.ops.features import image_features
    from captune.ops.lm import unwrap
    from captune.ops.sampling import sample_captions
    from captune.ops.scst import advantages, baseline, policy_loss, sequence_logprobs
    from captune.training.scst import sampler_spec

    loaded = load_model(cfg.model)
    torch.manual_seed(0)
    model = attach_lora(loaded.model, cfg.lora)
    model.eval()
    start = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    tok, rl = loaded.processor.tokenizer, cfg.rl
    feats = image_features(model, loaded.processor, [e.image for e in train_ex], batch_size=cfg.eval.batch_size)
    order = list(range(len(train_ex)))
    random.Random(rl.seed).shuffle(order)
    scorer, spec = CiderD([e.captions for e in train_ex]), sampler_spec(rl)
    parts = []
    for rank in (0, 1):
        mine = rank_share(order[: rl.batch_size], rank, 2)
        gen = torch.Generator().manual_seed(random.Random(f"{rl.seed}:0:{rank}").getrandbits(63))
        samples = sample_captions(model, tok, feats[mine], spec, generator=gen)
        rewards = torch.tensor(scorer.score(samples.captions, np.repeat(np.asarray(mine), rl.samples)))
        rewards = rewards.float().view(len(mine), rl.samples)
        parts.append((mine, samples, advantages(rewards, baseline(rewards))))
    mine = [i for p in parts for i in p[0]]
    tokens, mask = torch.cat([p[1].tokens for p in parts]), torch.cat([p[1].mask for p in parts])
    blip = unwrap(model)
    ids = generation_prompt(tok, len(mine), num_query_tokens=blip.config.num_query_tokens,
                            image_token_id=blip.config.image_token_index)  # fmt: skip
    lp = sequence_logprobs(model, feats[mine], ids.input_ids, ids.attention_mask, tokens, mask, spec=spec)
    policy_loss(lp, mask, torch.cat([p[2] for p in parts]), normalize=rl.normalize).backward()
    params = [p for p in model.parameters() if p.requires_grad]
    torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
    torch.optim.AdamW(params, lr=rl.lr, weight_decay=0.0).step()
    return start, {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}


@pytest.mark.slow  # ~60 s on 2 busy cores
@pytest.mark.parametrize("normalize", ["sequence", "token"])
def test_two_processes_step_as_one_process_on_both_shares(tmp_path, normalize):
    """DDP (2 CPU processes, gloo): each process samples and rewards its share of the step's images;
    the averaged, share-weighted gradients give the step of one process on all of their samples, and
    both processes hold the same adapter."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_scst_process, args=(port, normalize, tmp_path), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert ranks[0]["steps"] == ranks[1]["steps"] == 1
    start, want = _one_process_on_both_shares(_ddp_cfg(normalize), _examples(3, 5))
    assert not all(torch.equal(want[k], start[k]) for k in want)
    for name, value in want.items():
        assert torch.equal(ranks[0]["state"][name], ranks[1]["state"][name]), name
        # Adam's first step is about lr * sign(g): where |g| is near its eps, float noise in g moves
        # it by ~1e-6; a wrong weighting of the shares flips signs (2 * lr)
        torch.testing.assert_close(ranks[0]["state"][name], value, atol=2e-5, rtol=0)
    rows = [json.loads(x) for x in (tmp_path / "scst.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["type"] == "scst"] == [1]  # one process wrote the log


def test_the_scst_phase_is_skipped_when_off(tmp_path):
    from captune.run.folder import Run
    from captune.run.phases import run_phases

    said = []
    run = Run(tmp_path, Config(), log=said.append)
    run_phases(run, ("scst",))
    assert said == ["[scst] off (rl.enabled is false), skipped"]
    assert not any(tmp_path.iterdir())
