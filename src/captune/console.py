"""Console lines and the progress bar: a line written while a bar is shown must not tear it.

Kept apart from ``captune.training`` (which imports torch) so that the run folder can wrap its
log without loading the training stack."""

from __future__ import annotations

from collections.abc import Callable

_active: list = []  # the progress bars now shown (at most one in practice)


def around_bar(log: Callable[[str], None]) -> Callable[[str], None]:
    """``log`` that, while a progress bar is shown, clears it, writes the line and draws the bar again
    (tqdm's lock makes this safe from another thread, e.g. the background baseline scoring)."""
    if getattr(log, "around_bar", False):
        return log

    def write(message: str) -> None:
        bar = _active[-1] if _active else None
        if bar is None:
            log(message)
            return
        with type(bar).external_write_mode(file=bar.fp):  # clears the bars on this stream (or stdout/stderr)
            log(message)

    write.around_bar = True  # type: ignore[attr-defined]
    return write


def process_seconds() -> float | None:
    """Seconds since this process started (Linux: from /proc), or None where that cannot be read.

    The run records it as its start-up (interpreter, imports, checks) when the first phase begins."""
    import os
    from pathlib import Path

    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None
