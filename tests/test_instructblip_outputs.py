"""Merge, push and serve for InstructBLIP runs (LLaMA and T5 language models): the merged model
captions as base + adapter, the upload folder carries the Q-Former tokenizer and a card with the
InstructBLIP classes, the push reaches the Hub call, the web page's captioner reads the prompt."""

from __future__ import annotations

import json

import pytest
import torch

from captune.cli import main
from captune.config import EvalConfig, ModelConfig, load_config
from captune.model.load import load_model
from captune.ops.generation import caption_images
from tests.conftest import FAKE_TOKEN, jpeg_bytes

PROMPT = "a photo of"
IMAGES = [jpeg_bytes((200, 30, 30)), jpeg_bytes((30, 200, 30), (50, 20)), jpeg_bytes((20, 20, 220), (30, 60))]
ECFG = EvalConfig(batch_size=4, max_new_tokens=6, min_new_tokens=2)


def _make_run(model_dir, root):
    """A run folder as the train phase leaves it: config.yaml, RUN/adapter (PEFT + processor). The
    adapter's B matrices are random so merging changes the weights."""
    from captune.model.lora import attach_lora

    cfg = load_config("demo", [f"model.name_or_path={model_dir}", f"model.prompt={PROMPT}", "model.device=cpu"])
    loaded = load_model(cfg.model)
    torch.manual_seed(0)
    peft = attach_lora(loaded.model, cfg.lora)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    root.mkdir(parents=True)
    peft.save_pretrained(root / "adapter")
    loaded.processor.save_pretrained(root / "adapter")
    (root / "config.yaml").write_text(cfg.to_yaml())
    return root


@pytest.fixture(scope="module", params=["llama", "t5"])
def iblip_run(request, tmp_path_factory):
    model_dir = request.getfixturevalue(
        "tiny_instructblip_dir" if request.param == "llama" else "tiny_instructblip_t5_dir"
    )
    return _make_run(model_dir, tmp_path_factory.mktemp(f"iblip-run-{request.param}") / "run"), model_dir


def _tuned_captions(model_dir, adapter, prompt=PROMPT):
    from peft import PeftModel

    loaded = load_model(ModelConfig(name_or_path=str(model_dir), device="cpu", dtype="fp32", prompt=prompt))
    with torch.no_grad():  # the random T5 prefers <pad> everywhere; words make comparisons telling
        loaded.model.language_model.lm_head.weight[loaded.processor.tokenizer.pad_token_id] = 0
    tuned = PeftModel.from_pretrained(loaded.model, str(adapter)).eval()
    return caption_images(tuned, loaded.processor, IMAGES, ECFG, prompt), tuned, loaded


def test_merge_captions_as_base_plus_adapter(iblip_run, tmp_path, capsys):
    from transformers import InstructBlipForConditionalGeneration, InstructBlipProcessor

    run, model_dir = iblip_run
    out = tmp_path / "merged"
    assert main(["merge", str(run), "--out", str(out)]) == 0
    assert "InstructBlipForConditionalGeneration.from_pretrained" in capsys.readouterr().out
    assert isinstance(InstructBlipProcessor.from_pretrained(out), InstructBlipProcessor)
    merged = load_model(ModelConfig(name_or_path=str(out), device="cpu", dtype="fp32", prompt=PROMPT))
    assert isinstance(merged.model, InstructBlipForConditionalGeneration)
    assert not any("lora" in k for k in merged.model.state_dict())
    expected, tuned, base = _tuned_captions(model_dir, run / "adapter")
    with torch.no_grad():
        merged.model.language_model.lm_head.weight[merged.processor.tokenizer.pad_token_id] = 0
    assert caption_images(merged.model, merged.processor, IMAGES, ECFG, PROMPT) == expected
    with tuned.disable_adapter():  # the adapter matters: merging was not a no-op
        assert caption_images(tuned, base.processor, IMAGES, ECFG, PROMPT) != expected


def test_push_dry_run_carries_the_qformer_tokenizer(iblip_run, tmp_path):
    """The upload folder loads as an InstructBlipProcessor (its Q-Former tokenizer included) and the
    card's snippet, run against local copies, loads the adapter and captions."""
    from peft import PeftModel
    from PIL import Image
    from transformers import InstructBlipForConditionalGeneration, InstructBlipProcessor

    run, model_dir = iblip_run
    out = tmp_path / "staged"
    base_id = "Salesforce/instructblip-flan-t5-xl"
    args = ["push", str(run), "--repo", "someone/iblip", "--dry-run", "--out", str(out), "--base-model", base_id]
    assert main(args) == 0
    assert (out / "qformer_tokenizer" / "tokenizer.json").is_file()
    proc = InstructBlipProcessor.from_pretrained(out)
    original = InstructBlipProcessor.from_pretrained(run / "adapter")
    assert proc.qformer_tokenizer(PROMPT)["input_ids"] == original.qformer_tokenizer(PROMPT)["input_ids"]
    card = (out / "README.md").read_text()
    assert "from transformers import InstructBlipForConditionalGeneration, InstructBlipProcessor" in card
    assert "Blip2" not in card and "- instructblip" in card
    assert f'--prompt "{PROMPT}"' in card and "Q-Former reads the prompt" in card
    # the card's snippet, with local folders for the Hub ids
    base = InstructBlipForConditionalGeneration.from_pretrained(model_dir)
    model = PeftModel.from_pretrained(base, str(out)).eval()
    image = Image.open(__import__("io").BytesIO(IMAGES[0]))
    inputs = proc(images=image, text=PROMPT, return_tensors="pt")
    assert "qformer_input_ids" in inputs
    generated = model.generate(**inputs, num_beams=1, max_new_tokens=4)
    assert generated.shape[0] == 1


def test_push_reaches_the_hub_call_with_the_whole_folder(iblip_run, monkeypatch, capsys):
    import huggingface_hub

    run, _ = iblip_run
    uploaded = {}

    class FakeApi:
        def __init__(self, token=None):
            uploaded["token"] = token

        def create_repo(self, repo_id, private, exist_ok, repo_type):
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, folder_path, repo_id, repo_type, commit_message):
            from pathlib import Path

            root = Path(folder_path)
            uploaded["files"] = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr("captune.hub.base_license", lambda cfg, base, online: "other")  # no network
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    args = ["push", str(run), "--repo", "someone/iblip", "--base-model", "Salesforce/instructblip-vicuna-7b"]
    assert main(args) == 0
    assert uploaded["token"] == FAKE_TOKEN
    assert {"adapter_model.safetensors", "README.md", "qformer_tokenizer/tokenizer.json"} <= set(uploaded["files"])
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"]  # the run's own folder is left as it was
    out = capsys.readouterr()
    assert FAKE_TOKEN not in out.out + out.err


def test_serve_captioner_reads_the_prompt(iblip_run):
    """The web page's captioner: tuned captions are base + adapter's with the run's prompt as the
    instruction; base captions are the adapter switched off; another prompt reaches the Q-Former."""
    from captune.serve import Captioner, target_from_args

    run, model_dir = iblip_run
    target = target_from_args(str(run), None, None, "cpu")
    assert target.prompt == PROMPT
    captioner = Captioner(target.model, target.adapter, ECFG, target.prompt)
    with torch.no_grad():
        captioner.model.get_base_model().language_model.lm_head.weight[captioner.processor.tokenizer.pad_token_id] = 0
    base, tuned = captioner.caption(IMAGES)
    expected, peft, loaded = _tuned_captions(model_dir, run / "adapter")
    assert tuned == expected
    with peft.disable_adapter():
        assert base == caption_images(peft, loaded.processor, IMAGES, ECFG, PROMPT)
    other = caption_images(peft, loaded.processor, IMAGES, ECFG, "a drawing of")  # the prompt as instruction
    assert captioner.caption(IMAGES, prompt="a drawing of")[1] == other
