"""Atomic writes: a file or folder appears complete or not at all."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

_UMASK: int | None = None


def umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask both sets and gets)."""
    global _UMASK
    if _UMASK is None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("Umask:"):
                    _UMASK = int(line.split()[1], 8)
        except OSError:
            pass
        if _UMASK is None:
            _UMASK = os.umask(0o022)
            os.umask(_UMASK)
    return _UMASK


def mode_for(is_dir: bool) -> int:
    """The mode a plain ``open`` / ``mkdir`` would give: 0666 or 0777 less the umask.

    mkstemp and mkdtemp create owner-only (0600 / 0700) entries; once renamed into place
    they would make a shared run folder or a served report unreadable to others.
    """
    return (0o777 if is_dir else 0o666) & ~umask()


def mkstemp_like_open(prefix: str, dir: Path) -> tuple[int, str]:
    """``tempfile.mkstemp`` whose file gets the mode ``open`` would give it."""
    fd, tmp = tempfile.mkstemp(prefix=prefix, dir=dir)
    os.fchmod(fd, mode_for(False))
    return fd, tmp


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temp file beside ``path`` and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = mkstemp_like_open(f".{path.name}.", path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class staged_dir:
    """Context manager: a temp folder beside ``target`` that replaces it on success.

    On an exception (or a kill, since the name starts with a dot and holds ``.tmp-``)
    the temp folder is removed or recognisably stale; ``target`` is never half-written.
    """

    def __init__(self, target: Path):
        self.target = Path(target)

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.tmp-", dir=self.target.parent))
        os.chmod(self.tmp, mode_for(True))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        public_modes(self.tmp)
        if self.target.exists():
            shutil.rmtree(self.target)
        self.tmp.rename(self.target)


def public_modes(root: Path) -> None:
    """Give every entry under ``root`` the mode ``open``/``mkdir`` would (safetensors writes 0600 files)."""
    os.chmod(root, mode_for(True))
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(folder, name), mode_for(True))
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, mode_for(False))
