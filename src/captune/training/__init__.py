"""Training: the loop (``trainer``), its plan, steps, validation, checkpoints and log, and the
engines that run the step on one process, DDP, FSDP or DeepSpeed ZeRO."""

from captune.training.trainer import Trainer, TrainResult, train

__all__ = ["TrainResult", "Trainer", "train"]
