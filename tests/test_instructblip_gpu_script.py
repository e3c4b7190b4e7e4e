"""bench/instructblip_gpu.py, the GPU acceptance of InstructBLIP: its locally built processors (as
``captune.bench.build_processor`` makes them for the real architectures) and its --tiny CPU run."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from PIL import Image

from captune.bench import build_processor
from captune.model.architectures import blip2_config
from captune.ops.batching import IGNORE, encode_texts, training_text

SCRIPT = Path(__file__).parents[1] / "bench" / "instructblip_gpu.py"
PROMPT = "A short image caption:"


def _script():
    spec = importlib.util.spec_from_file_location("instructblip_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("arch", ["instructblip-vicuna-7b", "instructblip-flan-t5-xl"])
def test_bench_builds_an_instructblip_processor(arch, tmp_path):
    """An InstructBlipProcessor with a BERT-style Q-Former tokenizer over the Q-Former's 30,523 ids, the
    language model's tokenizer covering its vocabulary with <image> at the config's index; it saves and
    loads back like a Hub checkpoint's."""
    from transformers import InstructBlipProcessor

    cfg = blip2_config(arch)
    proc = build_processor(cfg)
    assert isinstance(proc, InstructBlipProcessor)
    qtok, tok = proc.qformer_tokenizer, proc.tokenizer
    assert len(qtok) == cfg.qformer_config.vocab_size == 30523
    assert len(tok) == cfg.text_config.vocab_size
    assert tok.convert_tokens_to_ids("<image>") == cfg.image_token_index
    q = qtok(PROMPT)["input_ids"]
    assert q[0] == 101 and q[-1] == 102 and 100 not in q  # [CLS] ... [SEP], every word known
    enc = proc(images=[Image.new("RGB", (64, 48), (200, 30, 30))], text=[PROMPT], return_tensors="pt")
    assert enc["qformer_input_ids"][0].tolist() == q
    assert enc["pixel_values"].shape == (1, 3, 224, 224)
    assert (enc["input_ids"][0, : cfg.num_query_tokens] == cfg.image_token_index).all()
    proc.save_pretrained(tmp_path)
    again = InstructBlipProcessor.from_pretrained(tmp_path)
    assert again.qformer_tokenizer(PROMPT)["input_ids"] == q
    assert again.tokenizer("a red dog")["input_ids"] == tok("a red dog")["input_ids"]


def test_bench_vicuna_tokenizer_keeps_llama_conventions():
    """<unk> 0, <s> 1 before the text, </s> 2 never appended, left padding, [PAD] at 32,000; training
    labels cover the caption and the EOS captune appends, nothing else."""
    cfg = blip2_config("instructblip-vicuna-7b")
    tok = build_processor(cfg).tokenizer
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 32000)
    assert tok.padding_side == "left"
    ids = tok("a red dog")["input_ids"]
    assert ids[0] == 1 and 2 not in ids and len(ids) == 4
    captions = ["a red dog", "a blue bus near the window"]
    batch = encode_texts(
        tok,
        [training_text(c, PROMPT, tok.eos_token) for c in captions],
        num_query_tokens=cfg.num_query_tokens,
        image_token_id=cfg.image_token_index,
        prompt=PROMPT,
    )
    for row, caption in enumerate(captions):
        labelled = batch.labels[row][batch.labels[row] != IGNORE].tolist()
        assert labelled == tok(caption, add_special_tokens=False)["input_ids"] + [2]


def test_tiny_configs_keep_the_real_structure():
    script = _script()
    for arch in ("instructblip-vicuna-7b", "instructblip-flan-t5-xl"):
        real, tiny = blip2_config(arch), script.tiny_config(arch)
        assert tiny.text_config.model_type == real.text_config.model_type
        assert tiny.text_config.vocab_size == real.text_config.vocab_size
        assert tiny.qformer_config.vocab_size == real.qformer_config.vocab_size
        assert (tiny.num_query_tokens, tiny.image_token_index) == (real.num_query_tokens, real.image_token_index)
        assert tiny.qformer_config.encoder_hidden_size == tiny.vision_config.hidden_size


@pytest.mark.slow  # ~25 s on 2 quiet cores, minutes when they are shared
def test_tiny_acceptance_run(tmp_path, capsys):
    """The --tiny run trains both families through the recipes on the planted signal (the loss falls),
    captions, writes the JSON, and says that 4-bit is skipped on the CPU."""
    out = tmp_path / "iblip.json"
    assert _script().main(["--tiny", "--out", str(out), "--steps", "25"]) == 0
    printed = capsys.readouterr().out
    assert "vicuna-7b-4bit: skipped: 4-bit NF4 needs a CUDA GPU and bitsandbytes" in printed
    result = json.loads(out.read_text())
    assert result["failed"] == [] and result["command"].startswith("python bench/instructblip_gpu.py --tiny")
    assert {"date", "device", "torch", "transformers", "peft"} <= set(result)
    cases = {row["case"]: row for row in result["cases"]}
    assert set(cases) == {"vicuna-7b-bf16", "vicuna-7b-4bit", "flan-t5-xl-bf16"}
    assert "skipped" in cases["vicuna-7b-4bit"]
    for name in ("vicuna-7b-bf16", "flan-t5-xl-bf16"):
        row = cases[name]
        assert row["steps"] == 25 and row["loss_last"] < 0.8 * row["loss_first"], row
        assert row["train_samples_per_s"] > 0 and row["caption_dynamic_cache_images_per_s"] > 0
        assert row["caption_static_cache_images_per_s"] > 0
        assert row["prompt"] == PROMPT
    assert cases["vicuna-7b-bf16"]["lora_target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert cases["vicuna-7b-bf16"]["packed"] and not cases["flan-t5-xl-bf16"]["packed"]
    assert cases["flan-t5-xl-bf16"]["lora_target_modules"] == ["q", "k", "v", "o"]
