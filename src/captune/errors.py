"""User-facing errors: one line, exit code 2, no traceback."""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix (bad config, bad data, missing files or tools).

    The CLI prints ``captune: error: <message>`` and exits with code 2.
    The message names the problem and the fix on one line.
    """

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


def is_out_of_memory(exc: BaseException) -> bool:
    """The GPU ran out of memory (torch.OutOfMemoryError; matched by name so torch need not be loaded)."""
    return type(exc).__name__ == "OutOfMemoryError"


def out_of_memory(
    where: str, train_batch: int | None = None, grad_accum: int = 1, eval_batch: int | None = None
) -> str:
    """What to do about running out of GPU memory in ``where``, naming the settings to lower."""
    where = f" {where}" if where else ""
    if train_batch is None or eval_batch is None:
        return f"GPU out of memory{where}; lower train.batch_size or eval.batch_size (or raise train.grad_accum)"
    return (
        f"GPU out of memory{where} (train.batch_size={train_batch}, eval.batch_size={eval_batch}); lower them, "
        f"e.g. train.batch_size={max(1, train_batch // 2)} train.grad_accum={grad_accum * 2} "
        f"eval.batch_size={max(1, eval_batch // 2)}"
    )


def disk_problem(exc: OSError) -> str | None:
    """A full, read-only or forbidden output location, described in a few words; else None."""
    import errno

    known = {
        errno.ENOSPC: "no space left on the device",
        errno.EROFS: "the file system is read-only",
        errno.EACCES: "permission denied",
        errno.EDQUOT: "disk quota exceeded",
    }
    if exc.errno in known:
        return known[exc.errno]
    text = str(exc).lower()
    for needle, why in (("no space left", known[errno.ENOSPC]), ("read-only file system", known[errno.EROFS])):
        if needle in text:
            return why
    return None
