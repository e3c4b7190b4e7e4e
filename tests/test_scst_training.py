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
    loaded = load_model(cfg.model)
    torch.manual_seed(0)
    model = attach_lora(loaded.model, cfg.lora)
    start = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    log = tmp_path / "scst.jsonl"
    result = train_scst(model, loaded.processor, train_ex, train_ex, cfg, log=lambda m: None, score_fn=_cider,
                        log_path=log)  # fmt: skip
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


def test_the_scst_phase_is_skipped_when_off(tmp_path):
    from captune.run.folder import Run
    from captune.run.phases import run_phases

    said = []
    run = Run(tmp_path, Config(), log=said.append)
    run_phases(run, ("scst",))
    assert said == ["[scst] off (rl.enabled is false), skipped"]
    assert not any(tmp_path.iterdir())
