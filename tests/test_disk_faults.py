"""A full disk and a read-only output folder: one clear line, exit 2, nothing half-written."""

import subprocess

import pytest

from captune.cli import main


def _mount(path, size, read_only=False):
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root): " + done.stderr.decode().strip())
    if read_only:
        subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "small"
    _mount(mnt, "300k")
    yield mnt
    subprocess.run(["umount", str(mnt)])


@pytest.fixture
def read_only(tmp_path):
    mnt = tmp_path / "ro"
    _mount(mnt, "1m", read_only=True)
    yield mnt
    subprocess.run(["umount", str(mnt)])


def test_full_disk(small_disk, capsys):
    run = small_disk / "run"
    assert main(["run", "demo", "--out", str(run), "data.num_images=400"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("captune: error: cannot write") and "no space left" in err and "\n" not in err
    leftovers = [p.name for p in run.iterdir() if p.name.startswith(".")]
    assert leftovers == []
    # whatever exists is complete: each phase folder has its final file
    final = {
        "data": "manifest.json",
        "baseline": "metrics.json",
        "finetuned": "metrics.json",
        "adapter": "adapter_config.json",
        "report": "index.html",
    }
    for name, marker in final.items():
        if (run / name).exists():
            assert (run / name / marker).is_file(), name


def test_read_only_output(read_only, capsys):
    assert main(["run", "demo", "--out", str(read_only / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "read-only" in err and "\n" not in err


def test_read_only_caption_output_names_the_file_and_option(read_only, tmp_path, capsys):
    from captune.demo import world

    (tmp_path / "a.png").write_bytes(world.make_items("plain", 1, seed=1)[0]["image"])
    out = read_only / "caps.txt"
    assert main(["caption", str(tmp_path / "a.png"), "--output", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"captune: error: cannot write {out}: the file system is read-only; choose another --output"


def test_disk_message_names_the_output_not_the_temporary():
    import errno

    from captune.cli import _disk_message

    exc = OSError(errno.EROFS, "x", "/r/runs/demo/.adapter.tmp-k2j4_x/adapter_model.safetensors")
    msg = _disk_message(exc, "the file system is read-only", ["train", "/r/runs/demo"])
    assert msg == "cannot write /r/runs/demo/adapter: the file system is read-only; choose another run folder"
    exc = OSError(errno.ENOSPC, "x", "/r/m/.config.yaml.ab12cd_9")
    msg = _disk_message(exc, "no space left on the device", ["merge", "RUN", "--out", "/r/m"])
    assert msg == "cannot write /r/m/config.yaml: no space left on the device; free space or choose another --out"
