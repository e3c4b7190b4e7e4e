"""captune bench's target rows: shares, met, and the sentences computed from the run's own figures."""

from captune import bench, bench_targets
from captune.cli import main


def _result():
    classes = {"matrix products": 70.0, "attention": 14.0, "other": 30.0, "layer norms": 6.0}
    profile = {"wall_ms_profiled": 130.0, "kernel_ms": 120.0, "kernels": 2000, "by_class_ms": classes}
    return {
        "train_packed_samples_per_s": 2000.0, "train_batch_pairs": 260, "train_packed_profile": profile,
        "caption_images_per_s": 2100.0, "lm_parameters": 2_650_000_000,
        "caption_parts": {"batch": 2048, "prefill_s": 0.5, "decode_step_s": 0.03, "whole_s": 0.975, "prompt_len": 33},
        "features_from_jpeg_images_per_s": 800.0,
        "caption_cli_images_per_s": 500.0,
        "e2e_job_s": 48.0, "e2e_phases_s": {"start-up": 6.0, "train": 30.0, "baseline scoring (overlapped)": 9.0},
        "e2e_train_samples_per_s": 1600.0, "e2e_train_steps": 150, "e2e_train_batch_pairs": 256, "e2e_images": 5000,
        "train_4bit_share_of_bf16": 0.48, "train_4bit_packed_samples_per_s": 960.0,
        "train_4bit_lora_compute": "fp32 (peft)", "train_lora_compute": "64 LoRA layers as one function each",
    }  # fmt: skip


def test_each_measured_target_gets_its_share_and_why():
    rows = {r["target"]: r for r in bench_targets.targets(_result())}
    train = rows["packed training"]
    assert train["share_of_goal"] == round(2000 / 3000, 3) and not train["met"]
    # 260 pairs at 2,000/s: a 130 ms step; 70 ms of products alone would give 260/0.070 = 3714/s
    assert "130.0 ms" in train["why"] and "3714 samples/s" in train["why"] and "at most 16.7 ms" in train["why"]
    assert "(now 60.0, 50.0 of it kernels)" in train["why"]  # wall beside the products, and kernels beside them
    cap = rows["captioning from cached features"]
    assert cap["met"] and "caps the rate at 4096" in cap["why"]
    job = rows["whole coco5k job, fresh process"]
    assert job["share_of_goal"] == round(30 / 48, 3) and not job["met"]
    assert "overlapped" not in job["why"] and "6.2 s" in job["why"] and "24.0 s" in job["why"]
    cli = rows["`captune caption` from JPEG files, after the model load"]
    assert "579 images/s" in cli["why"]  # 1 / (1/800 + 1/2100)
    quant = rows["4-bit NF4 packed training, share of bf16's at the same micro-batch"]
    assert not quant["met"] and quant["share_of_goal"] == 0.96 and "960.0 against 2000.0 samples/s" in quant["why"]
    table = bench_targets.targets_table(list(rows.values()))
    assert "| packed training | 2000.0 samples/s | 3000 | 67% | no |" in table


def test_a_profile_without_matrix_products_still_gives_a_row():
    """A profile with no kernel events (no CUPTI) or none recognised: the row says so, no division by zero."""
    result = _result()
    result["train_packed_profile"] = {"wall_ms_profiled": 1.0, "kernel_ms": 0.0, "kernels": 0, "by_class_ms": {}}
    del result["lm_parameters"]
    rows = {r["target"]: r for r in bench_targets.targets(result)}
    assert rows["packed training"]["why"] == "a step of 260 pairs takes 130.0 ms (no profile of its kernels)"
    assert "TFLOP/s" not in rows["captioning from cached features"]["why"]


def test_a_target_the_run_did_not_measure_has_no_row():
    result = _result()
    del result["caption_cli_images_per_s"]
    assert all("captune caption" not in r["target"] for r in bench_targets.targets(result))


def test_kernels_sorted_into_classes():
    assert bench_targets.kernel_class("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_bias_TNT") == "matrix products"
    assert bench_targets.kernel_class("fmha_cutlassB_bf16_aligned_128x128_k128_sm80") == "attention"
    assert bench_targets.kernel_class("_decode_kernel") == "attention"
    assert bench_targets.kernel_class("void at::native::vectorized_layer_norm_kernel<c10::BFloat16>") == "layer norms"
    assert bench_targets.kernel_class("void at::native::vectorized_elementwise_kernel<8, CUDAFunctor_add>") == "other"


def test_the_caption_commands_closing_line_is_read(tmp_path, tiny_model_dir, image_folder, capsys):
    """The line bench reads is the one ``captune caption`` prints (the real command, the tiny model)."""
    out = tmp_path / "caps.jsonl"
    argv = ["caption", str(image_folder), "--model", str(tiny_model_dir), "--device", "cpu", "--max-new-tokens", "3"]
    assert main([*argv, "--format", "jsonl", "--output", str(out)]) == 0
    found = bench.parse_caption_report(capsys.readouterr().err)
    assert found is not None and found["images"] == 6 and found["images_per_s"] > 0
    assert bench.parse_caption_report("captune: nothing") is None


def test_4bit_without_bitsandbytes_says_so_before_loading_anything(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "bitsandbytes" else real(n, *a))
    got = bench.measure_4bit(tmp_path / "no-model-here", [], 2000.0)
    assert got == {"train_4bit_error": "bitsandbytes is not installed (pip install 'captune[quant]')"}


def test_the_commands_bound_uses_the_decoders_pace_at_the_commands_batch():
    result = _result() | {"caption_cli_batch": 1024, "caption_images_per_s_by_batch": {1024: 1700.0, 2048: 2100.0}}
    rows = {r["target"]: r for r in bench_targets.targets(result)}
    why = rows["`captune caption` from JPEG files, after the model load"]["why"]
    assert "1700 at batch 1024" in why and "544 images/s" in why  # 1 / (1/800 + 1/1700)


def test_the_features_row_names_the_plain_vision_rate_when_measured():
    result = _result() | {"features_from_jpeg_plain_vision_images_per_s": 760.0}
    rows = {r["target"]: r for r in bench_targets.targets(result)}
    assert "760.0 images/s with the checkpoint's own modules" in rows["image features from JPEG bytes"]["why"]
