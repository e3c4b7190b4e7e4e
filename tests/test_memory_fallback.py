"""Out of GPU memory during training: the run starts the training again with half the micro-batch.

A CPU cannot run out of GPU memory, so the step raises ``torch.OutOfMemoryError`` (what the CUDA
allocator raises) whenever a micro-batch holds more pairs than a planted budget; everything
else is the real run.
"""

import shutil

import torch
import yaml
from safetensors.torch import load_file

import captune.training.steps as training  # the training step's packed loss
from captune.cli import main

SETTINGS = ["data.num_images=40", "train.epochs=2", "lora.dropout=0", "eval.bootstrap=20"]


def _budget(monkeypatch, max_pairs: int) -> list[int]:
    sizes: list[int] = []
    real = training.packed_loss

    def limited(model, features, batch):
        if not torch.is_grad_enabled():  # validation loss: its batches follow eval.batch_size
            return real(model, features, batch)
        sizes.append(batch.pairs)
        if batch.pairs > max_pairs:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, features, batch)

    monkeypatch.setattr(training, "packed_loss", limited)
    return sizes


def test_out_of_memory_halves_the_micro_batch_and_matches_that_run(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    assert main(["data", str(run), "--recipe", "demo", *SETTINGS, "train.batch_size=16"]) == 0
    twin = tmp_path / "twin"
    shutil.copytree(run, twin)

    sizes = _budget(monkeypatch, max_pairs=9)  # demo images have 3 captions: 18 pairs, then 9
    assert main(["train", str(run)]) == 0
    out = capsys.readouterr().out
    assert "GPU out of memory at train.batch_size=16; starting again with train.batch_size=8 train.grad_accum=2" in out
    assert sizes[0] > 9 and max(sizes[1:]) <= 9  # after the first failure every micro-batch fits
    used = yaml.safe_load((run / "adapter" / "captune_config.yaml").read_text())["train"]
    assert (used["batch_size"], used["grad_accum"]) == (8, 2)
    saved = yaml.safe_load((run / "config.yaml").read_text())["train"]
    assert saved["batch_size"] == 16  # the run's own config is unchanged: a rerun is not "different"

    monkeypatch.undo()
    assert (
        main(["train", str(twin), "--force", "--recipe", "demo", *SETTINGS, "train.batch_size=8", "train.grad_accum=2"])
        == 0
    )
    a = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(twin / "adapter" / "adapter_model.safetensors"))
    for k in a:  # the retry starts from the same LoRA initialisation: the same adapter
        assert torch.allclose(a[k], b[k], atol=1e-5), k


def test_out_of_memory_at_one_pair_is_the_one_line_error(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    assert main(["data", str(run), "--recipe", "demo", *SETTINGS, "train.batch_size=2"]) == 0
    _budget(monkeypatch, max_pairs=0)
    assert main(["train", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("captune: error: GPU out of memory in phase train even with one pair") and "\n" not in err


def test_resume_uses_the_micro_batch_of_the_checkpoint(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    assert main(["data", str(run), "--recipe", "demo", *SETTINGS, "train.batch_size=16", "train.epochs=1"]) == 0
    _budget(monkeypatch, max_pairs=9)
    assert main(["train", str(run)]) == 0
    before = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    monkeypatch.undo()
    shutil.rmtree(run / "adapter")  # as if the process died after its last checkpoint
    capsys.readouterr()
    assert main(["train", str(run)]) == 0
    assert "resuming from step-" in capsys.readouterr().out
    used = yaml.safe_load((run / "adapter" / "captune_config.yaml").read_text())["train"]
    assert (used["batch_size"], used["grad_accum"]) == (8, 2)
    after = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)
