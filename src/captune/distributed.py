"""Several processes under ``torchrun`` or ``accelerate launch``: who does what.

captune does not start processes itself; the launchers do, and accelerate's
``PartialState`` forms the process group (NCCL on GPUs, gloo on CPUs). Training runs
on every process with gradients averaged by PyTorch's DistributedDataParallel;
everything that writes files or talks to the user (data preparation, evaluation,
reports, checkpoints, logs) runs on the main process while the others wait.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from captune import launch
from captune.errors import UserError


@dataclass(frozen=True)
class World:
    size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


_WORLD: World | None = None


def world() -> World:
    """This process's place in the launch; forms the process group on first use."""
    global _WORLD
    if _WORLD is not None:
        return _WORLD
    size = launch.world_size()
    if size <= 1:
        _WORLD = World()
        return _WORLD
    import torch
    from accelerate import PartialState

    gpu = torch.cuda.is_available()
    # NCCL bound to this process's GPU from the start (torch otherwise guesses it from the rank, and warns)
    # (DeepSpeed forms its group itself, without that argument)
    bound = {} if not gpu or launch.uses_deepspeed() else {"device_id": torch.device("cuda", launch.local_rank())}
    try:
        state = PartialState(cpu=not gpu, timeout=timedelta(minutes=30), **bound)
    except (ValueError, RuntimeError) as exc:
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"WORLD_SIZE={size} but the process group cannot be formed ({why}); "
            "start captune with torchrun or accelerate launch, or unset WORLD_SIZE"
        ) from None
    if state.num_processes != size:
        raise UserError(
            f"launched as {size} processes, but they did not form one process group "
            f"(this one sees {state.num_processes}); on a machine without GPUs use torchrun or "
            "'accelerate launch --multi_cpu', on GPUs 'accelerate launch --multi_gpu' or torchrun"
        )
    _WORLD = World(size=state.num_processes, rank=state.process_index, local_rank=state.local_process_index)
    return _WORLD


def close() -> None:
    """Leave the process group at the end of a command that went well (torch warns of leaked
    resources otherwise). After an error the processes just exit: a peer may never arrive."""
    if _WORLD is None or not _WORLD.distributed:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if world().distributed:
        import torch.distributed as dist

        dist.barrier()


def all_mean(value: float) -> float:
    """Mean of a number over all processes (the number itself when alone)."""
    w = world()
    if not w.distributed:
        return value
    import torch
    import torch.distributed as dist

    device = torch.device("cuda", w.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / w.size


def all_agree(flag: bool) -> bool:
    """True only when every process says True (a decision all processes must share)."""
    w = world()
    if not w.distributed:
        return flag
    return all_mean(1.0 if flag else 0.0) == 1.0


def gather_strided(part, total: int):
    """The whole of a stride-split tensor on every process: process r holds rows r, r + size,
    r + 2 size, ... of ``total``; returns all ``total`` rows in order, on ``part``'s device, through
    one all-gather (NCCL between GPUs, gloo on CPUs) rather than through files."""
    import torch
    import torch.distributed as dist

    w = world()
    if not w.distributed:
        return part
    per = -(-total // w.size)  # rows of the largest share; smaller shares are padded to it
    padded = part.new_zeros((per, *part.shape[1:]))
    padded[: part.size(0)] = part
    pieces = [torch.empty_like(padded) for _ in range(w.size)]
    dist.all_gather(pieces, padded.contiguous())
    # row j of share r is row j * size + r: interleave, then drop the padding (it sorts last)
    return torch.stack(pieces, dim=1).reshape(per * w.size, *part.shape[1:])[:total]


def gather_strided_objects(part: list, total: int) -> list:
    """The stride-split list (process r holds items r, r + size, ...) whole and in order on the main
    process, through one gather of Python objects; the other processes get []."""
    w = world()
    if not w.distributed:
        return part
    import torch.distributed as dist

    shares: list = [None] * w.size if w.is_main else []
    dist.gather_object(part, shares if w.is_main else None, dst=0)
    if not w.is_main:
        return []
    whole: list = [None] * total
    for r, share in enumerate(shares):
        whole[r :: w.size] = share
    return whole
