"""Training: reproducible, loss falls, best adapter kept, bad targets refused."""

import json

import pytest
import torch

from captune.config import Config, LoraConfig
from captune.data.prepare import Example
from captune.demo import world
from captune.errors import UserError
from captune.model.load import load_model
from captune.model.lora import attach_lora, target_modules
from captune.training import train


def _examples(n, seed, style="catalog"):
    return [Example(it["image_id"], it["image"], it["captions"]) for it in world.make_items(style, n, seed=seed)]


def _cfg(**train):
    cfg = Config()
    cfg.model.device = "cpu"
    cfg.lora.target_modules = "all-linear"
    cfg.train.batch_size = 16
    cfg.train.lr = 3e-3
    cfg.train.log_every = 1
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def _train(cfg, train_ex, val_ex, score_fn=None):
    loaded = load_model(cfg.model)
    torch.manual_seed(cfg.train.seed)
    model = attach_lora(loaded.model, cfg.lora)
    result = train(model, loaded.processor, train_ex, val_ex, cfg, log=lambda m: None, score_fn=score_fn)
    state = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    return result, state


def test_same_seed_same_adapter_and_loss_falls():
    train_ex, val_ex = _examples(48, 1), _examples(8, 2)
    cfg = _cfg(epochs=2, validate_every=1, select="loss")
    r1, s1 = _train(cfg, train_ex, val_ex)
    r2, s2 = _train(cfg, train_ex, val_ex)
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    losses = [h["loss"] for h in r1.history if h["type"] == "train"]
    assert losses[-1] < losses[0] * 0.8
    vals = [h["loss"] for h in r1.history if h["type"] == "validation"]
    assert vals[-1] < vals[0]


def test_best_adapter_is_kept():
    """A scorer that prefers epoch 1 makes training end with epoch 1's adapter, not the last one."""
    train_ex, val_ex = _examples(32, 3), _examples(4, 4)
    cfg = _cfg(epochs=3, validate_every=1, select="CIDEr")
    loaded = load_model(cfg.model)
    torch.manual_seed(cfg.train.seed)
    model = attach_lora(loaded.model, cfg.lora)
    snapshots = []

    def score(caps, refs):
        snapshots.append({k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad})
        return 10.0 if len(snapshots) == 1 else 0.0

    result = train(model, loaded.processor, train_ex, val_ex, cfg, log=lambda m: None, score_fn=score)
    final = {k: v for k, v in model.named_parameters() if v.requires_grad}
    assert len(snapshots) == 3
    assert result.best_step == [h for h in result.history if h["type"] == "validation"][0]["step"]
    assert all(torch.equal(final[k], snapshots[0][k]) for k in final)
    assert not all(torch.equal(snapshots[0][k], snapshots[2][k]) for k in final)


def test_target_that_matches_nothing_lists_names():
    loaded = load_model(Config().model.__class__(name_or_path="builtin:demo", device="cpu"))
    with pytest.raises(UserError, match="match no linear layer.*fc1"):
        attach_lora(loaded.model, LoraConfig(target_modules=["query", "value"]))


def test_presets_resolve_per_family():
    loaded = load_model(Config().model.__class__(name_or_path="builtin:demo", device="cpu"))
    assert target_modules(loaded.model, LoraConfig(target_modules="seed")) == ["q_proj", "k_proj"]
    model = attach_lora(loaded.model, LoraConfig(target_modules="seed"))
    adapted = {n for n, _ in model.named_modules() if n.endswith("lora_A")}
    assert adapted and all(".language_model." in n for n in adapted)
    assert all(n.split(".")[-2] in ("q_proj", "k_proj") for n in adapted)


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("stop_at, every", [(5, 2), (8, 0)])
def test_resume_equals_uninterrupted(tmp_path, stop_at, every):
    """Stopped after step ``stop_at``, then resumed.

    With every=2 the stop is mid-epoch; with every=0 the last checkpoint is the end of epoch 1.
    """
    train_ex, val_ex = _examples(40, 5), _examples(6, 6)
    cfg = _cfg(epochs=3, validate_every=1, select="loss", checkpoint_every=every)
    cfg.train.batch_size = 20  # 6 captions-groups per epoch -> 6 steps per epoch with packing off
    cfg.train.pack = False
    full, full_state = _train(cfg, train_ex, val_ex)

    def run(on_step=None):
        loaded = load_model(cfg.model)
        torch.manual_seed(cfg.train.seed)
        model = attach_lora(loaded.model, cfg.lora)
        result = train(
            model,
            loaded.processor,
            train_ex,
            val_ex,
            cfg,
            log=lambda m: None,
            checkpoint_dir=tmp_path / "ckpt",
            on_step=on_step,
            log_path=tmp_path / "train.jsonl",
        )
        return result, {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}

    def stop(step):
        if step == stop_at:
            raise Interrupt

    with pytest.raises(Interrupt):
        run(stop)
    assert any((tmp_path / "ckpt").glob("step-*/state.json"))
    resumed, state = run()
    assert resumed.steps == full.steps and resumed.best_step == full.best_step
    assert all(torch.equal(state[k], full_state[k]) for k in full_state)
    logged = [json.loads(x) for x in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if r["type"] == "validation"] == [
        h["step"] for h in full.history if h["type"] == "validation"
    ]
    # the pace after a resume counts the pairs trained since the process started, not those before it
    resumed = 4 if every else 6  # the newest checkpoint when the first run stopped (20 pairs a step)
    first_new = next(r for r in logged if r["type"] == "train" and r["step"] > resumed)
    pairs = first_new["samples_per_s"] * first_new["elapsed_s"]
    assert pairs < 25, f"{pairs:.1f} pairs since the resume (one step of 20), not those of the earlier run too"


def test_early_stop_after_patience():
    train_ex, val_ex = _examples(16, 7), _examples(4, 8)
    scores = iter([1.0, 0.5, 0.4, 0.3, 0.2])
    cfg = _cfg(epochs=5, validate_every=1, select="CIDEr", early_stop=2)
    result, _ = _train(cfg, train_ex, val_ex, score_fn=lambda caps, refs: next(scores))
    validations = [h for h in result.history if h["type"] == "validation"]
    assert len(validations) == 3 and result.stopped_early
    assert result.best_step == validations[0]["step"]


# ------------------------------------------------------------------ FlanT5 (encoder-decoder)


def test_t5_presets_and_target_errors(tiny_t5_dir):
    loaded = load_model(Config().model.__class__(name_or_path=str(tiny_t5_dir), device="cpu"))
    assert target_modules(loaded.model, LoraConfig(target_modules="seed")) == ["q", "k"]
    with pytest.raises(UserError, match="match no linear layer.*wi_0"):
        attach_lora(loaded.model, LoraConfig(target_modules=["q_proj", "k_proj"]))  # the OPT names: a classic trap
    model = attach_lora(loaded.model, LoraConfig(target_modules="attention"))
    adapted = {n.rsplit(".", 2)[-2] for n, _ in model.named_modules() if n.endswith("lora_A")}
    assert adapted == {"q", "k", "v", "o"}


def test_t5_run_learns_a_planted_style(tiny_t5_dir, tmp_path):
    """The whole pipeline on a FlanT5-style BLIP-2: caption loss falls, the adapter is plain PEFT, captions change."""
    from peft import PeftModel

    from captune.cli import main

    out = tmp_path / "t5run"
    overrides = [
        f"model.name_or_path={tiny_t5_dir}",
        "data.num_images=80",
        "train.epochs=4",
        "train.lr=0.01",
        "lora.target_modules=all-linear",
        "model.prompt=a photo of",
        "eval.bootstrap=100",
        "report.examples=2",
    ]
    assert main(["run", "demo", "--out", str(out), *overrides]) == 0
    log = [json.loads(x) for x in (out / "logs" / "train.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in log if r["type"] == "train"]
    val_losses = [r["loss"] for r in log if r["type"] == "validation"]
    assert train_losses[-1] < train_losses[0] * 0.5 and val_losses[-1] < val_losses[0]
    base = [json.loads(x)["caption"] for x in (out / "baseline" / "predictions.jsonl").read_text().splitlines()]
    tuned = [json.loads(x)["caption"] for x in (out / "finetuned" / "predictions.jsonl").read_text().splitlines()]
    assert base != tuned and all(t and not t.startswith("a photo of") for t in tuned)
    metrics = json.loads((out / "finetuned" / "metrics.json").read_text())
    assert metrics["CIDEr"] > json.loads((out / "baseline" / "metrics.json").read_text())["CIDEr"]
    loaded = load_model(Config().model.__class__(name_or_path=str(tiny_t5_dir), device="cpu"))
    peft_model = PeftModel.from_pretrained(loaded.model, str(out / "adapter"))
    assert any("language_model.encoder" in n and "lora_A" in n for n, _ in peft_model.named_parameters())


def test_quantization_errors_are_one_line(monkeypatch):
    import sys

    from captune.config import ModelConfig

    with pytest.raises(UserError, match="model.quantization=4bit needs a CUDA GPU"):
        load_model(ModelConfig(device="cpu", quantization="4bit"))
    import captune.model.load as modeling

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(UserError, match=r"needs bitsandbytes: pip install 'captune\[quant\]'"):
        modeling.quantization_config(ModelConfig(quantization="8bit"), torch.device("cuda"), torch.bfloat16)


# ------------------------------------------------------------------ trackers and progress


def test_tensorboard_tracker_and_progress_bar(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train_ex, val_ex = _examples(16, 11), _examples(4, 12)
    cfg = _cfg(epochs=2, validate_every=1, select="loss", log_every=2)
    cfg.train.trackers = ["tensorboard"]
    cfg.train.progress = "on"
    loaded = load_model(cfg.model)
    model = attach_lora(loaded.model, cfg.lora)
    log_path = tmp_path / "logs" / "train.jsonl"
    result = train(model, loaded.processor, train_ex, val_ex, cfg, log=print, log_path=log_path)
    events = list((tmp_path / "logs").rglob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train/loss", "train/lr", "validation/loss"} <= set(tags)
    logged = [e.value for e in acc.Scalars("train/loss")]
    assert logged == pytest.approx([h["loss"] for h in result.history if h["type"] == "train"], rel=1e-6)
    err = capsys.readouterr().err
    assert f"{result.steps}/{result.steps}" in err and "loss=" in err and "samples/s=" in err


def test_tracker_errors(monkeypatch):
    import importlib.util

    from captune.config import load_config
    from captune.training.progress import Trackers

    with pytest.raises(UserError, match="train.trackers: unknown \\['tensorbored'\\]"):
        load_config("demo", ["train.trackers=[tensorbored]"])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "wandb" else real(n, *a))
    with pytest.raises(UserError, match="install it first: pip install wandb"):
        Trackers(["wandb"], None, {})


# ------------------------------------------------------------------ Q-Former adapters


def test_qformer_preset_trains_through_cached_vision_outputs(tmp_path):
    """LoRA on the Q-Former: the loss on cached vision outputs equals the full model's, gradients reach
    the Q-Former adapters, and a run's fine-tuned captions come from the trained Q-Former, not the cache."""
    import io

    from PIL import Image

    from captune.cli import main
    from captune.model.lora import adapter_touches_vision
    from captune.ops.batching import encode_texts, training_text
    from captune.ops.features import image_features, project_queries
    from captune.ops.lm import lm_loss

    loaded = load_model(Config().model.__class__(device="cpu"))
    torch.manual_seed(0)
    model = attach_lora(loaded.model, LoraConfig(target_modules="qformer", dropout=0.0))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(".qformer." in n and ".attention." in n for n in names) and adapter_touches_vision(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    model.eval()
    items = world.make_items("catalog", 3, seed=3)
    proc, tok = loaded.processor, loaded.processor.tokenizer
    vision = image_features(model, proc, [it["image"] for it in items], stage="vision")
    text = encode_texts(
        tok,
        [training_text(it["captions"][0], "", tok.eos_token) for it in items],
        num_query_tokens=proc.num_query_tokens,
        image_token_id=model.get_base_model().config.image_token_index,
    )
    blip = model.get_base_model()
    ours = lm_loss(model, project_queries(blip, vision), text.input_ids, text.attention_mask, text.labels)
    pixels = proc.image_processor([Image.open(io.BytesIO(it["image"])) for it in items], return_tensors="pt")
    theirs = model(
        pixel_values=pixels["pixel_values"],
        input_ids=text.input_ids,
        attention_mask=text.attention_mask,
        labels=text.labels,
    ).loss
    assert torch.allclose(ours, theirs, atol=1e-5)
    ours.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)

    out = tmp_path / "qf"
    assert main(["run", "demo", "--out", str(out), "lora.target_modules=qformer", "data.num_images=60",
                 "train.epochs=2", "train.log_every=1", "eval.bootstrap=50", "report.examples=2"]) == 0  # fmt: skip
    log = [json.loads(x) for x in (out / "logs" / "train.jsonl").read_text().splitlines()]

    def mean_loss(epoch):  # single steps are noisy (a partial last batch, different captions)
        rows = [r["loss"] for r in log if r["type"] == "train" and r["epoch"] == epoch]
        return sum(rows) / len(rows)

    assert mean_loss(2) < mean_loss(1)
    from peft import PeftModel

    tuned = PeftModel.from_pretrained(load_model(Config().model.__class__(device="cpu")).model, str(out / "adapter"))
    from captune.config import EvalConfig, load_config
    from captune.data.prepare import load_split
    from captune.ops.generation import caption_features

    cfg = load_config("demo")
    test = load_split(out / "data", "test")
    feats = image_features(tuned, proc, [e.image for e in test])
    expected = caption_features(tuned, tok, feats, EvalConfig(batch_size=cfg.eval.batch_size,
                                max_new_tokens=cfg.eval.max_new_tokens))  # fmt: skip
    got = [json.loads(x)["caption"] for x in (out / "finetuned" / "predictions.jsonl").read_text().splitlines()]
    assert got == expected


def test_label_counter_equals_the_batch_count(tiny_model_dir):
    """Per-pair counts, remembered, add up to a whole unpacked batch's count."""
    from captune.config import ModelConfig, load_config
    from captune.model.load import load_model
    from captune.ops.batching import label_tokens
    from captune.training.steps import LabelCounter, encode_pairs

    loaded = load_model(ModelConfig(name_or_path=str(tiny_model_dir), device="cpu"))
    cfg = load_config("demo")
    tok, blip = loaded.processor.tokenizer, loaded.model
    caps = [["a red circle", "two small blue squares on the left edge"], ["one", "a b c d e f g h i j k l"]]
    pairs = [(i, c) for i, cs in enumerate(caps) for c in cs]
    flat = LabelCounter(tok, blip, cfg)
    assert flat(pairs) == label_tokens(encode_pairs(tok, blip, [c for _, c in pairs], cfg).labels, False)
    assert flat(pairs[:2]) + flat(pairs[2:]) == flat(pairs) and set(flat.known) == set(pairs)


def test_validation_is_announced_before_the_steps_that_train_while_it_is_scored():
    """With CIDEr scored in the background, the validation's loss is printed at once: the next
    epoch's step lines no longer seem to come before the validation they follow."""
    train_ex, val_ex = _examples(16, 7), _examples(4, 8)
    cfg = _cfg(epochs=2, validate_every=1, select="CIDEr")
    loaded = load_model(cfg.model)
    torch.manual_seed(cfg.train.seed)
    model = attach_lora(loaded.model, cfg.lora)
    lines: list[str] = []
    train(model, loaded.processor, train_ex, val_ex, cfg, log=lines.append, score_fn=lambda caps, refs: 1.0)
    first = next(i for i, line in enumerate(lines) if "validation after epoch 1" in line)
    assert "CIDEr scoring in the background" in lines[first]
    steps_before = [line for line in lines[:first] if line.lstrip().startswith("step ")]
    assert steps_before and all("epoch 1 " in line for line in steps_before), lines[: first + 1]


def test_a_deferred_epoch_end_checkpoint_says_which_epoch_end_it_is(tmp_path):
    """The epoch-end checkpoint waits for its validation's CIDEr (scored in the background) and is
    written, named by a later step, during the next epoch: the log says which epoch end it stands for."""
    train_ex, val_ex = _examples(16, 7), _examples(4, 8)
    cfg = _cfg(epochs=2, validate_every=1, select="CIDEr", checkpoint_every=0)
    loaded = load_model(cfg.model)
    torch.manual_seed(cfg.train.seed)
    model = attach_lora(loaded.model, cfg.lora)
    lines: list[str] = []
    train(model, loaded.processor, train_ex, val_ex, cfg, log=lines.append, score_fn=lambda caps, refs: 1.0,
          checkpoint_dir=tmp_path / "ckpt")  # fmt: skip
    ended = int(next(x for x in lines if "validation after epoch 1 (step" in x).split("(step ")[1].split(")")[0])
    note = [x for x in lines if "written once its validation was scored" in x]
    assert len(note) == 1, lines
    name = note[0].split("checkpoint ")[1].split(" ")[0]
    assert note[0] == f"  checkpoint {name} (epoch 1's end at step {ended}, written once its validation was scored)"
    assert int(name.removeprefix("step-")) > ended
    assert lines.index(note[0]) > next(i for i, x in enumerate(lines) if f"step {ended + 1}/" in x)


def test_packed_captions_are_made_ahead_by_a_thread_and_train_the_same_adapter(monkeypatch):
    """The packed steps' captions are tokenized and packed by the text-feed thread, not by the thread
    that launches the step's kernels (on an H200 that was ~15% of its time); made in the loop
    instead, the adapter is bit-identical."""
    import threading

    from captune.training import steps as steps_module
    from captune.training.ahead import Ahead

    train_ex, val_ex = _examples(48, 1), _examples(8, 2)
    cfg = _cfg(epochs=2, validate_every=0)
    where: list[str] = []
    real = steps_module.pack_captions

    def spy(*args, **kwargs):
        where.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(steps_module, "pack_captions", spy)
    _, ahead = _train(cfg, train_ex, val_ex)
    assert where and set(where) == {"captune-text-feed"}
    where.clear()
    monkeypatch.setattr(Ahead, "plan", lambda self, keys: None)  # every micro-batch made in the loop
    _, inline = _train(cfg, train_ex, val_ex)
    assert set(where) == {threading.current_thread().name}
    assert ahead.keys() == inline.keys() and all(torch.equal(ahead[k], inline[k]) for k in ahead)


@pytest.mark.parametrize("residence", ["gpu", "stream"])
def test_trained_model_is_freed_without_the_cycle_collector(residence):
    """After ``train`` returns, dropping the model frees it at once: no reference cycle of training's holds
    it until Python's cycle collector runs. The text feed's and the streamed feature feed's threads once
    held bound methods of their owners, which held the model and the split's features: a second model
    loaded in the same process (a notebook, or the GPU precision tests) found the first one's memory still
    taken. (LoRA layers patched for 16-bit products, on a GPU only, are covered in test_lora_compute.py.)"""
    import gc
    import weakref

    train_ex, val_ex = _examples(24, 1), _examples(4, 2)
    cfg = _cfg(epochs=1, validate_every=0, feature_residence=residence)

    def run():
        loaded = load_model(cfg.model)
        alive = weakref.ref(loaded.model)
        model = attach_lora(loaded.model, cfg.lora)
        assert train(model, loaded.processor, train_ex, val_ex, cfg, log=lambda m: None).steps > 0
        return alive

    # a first run in the process imports transformers' lazy modules, and some of those imports leave cycles
    # through their frames that hold the caller's (load_model's) locals: not what this test is about
    run()
    gc.collect()
    gc.disable()
    try:
        assert run()() is None
    finally:
        gc.enable()
