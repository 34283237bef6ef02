"""Training configuration (paper Table 7 / appendix B.2 defaults)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from ..errors import ConfigError

__all__ = ["TrainConfig"]


@dataclass
class TrainConfig:
    """One training run (a pre-training stage or a task fine-tuning)."""

    stage: Literal["stage1", "stage2", "annotate", "describe", "generate"] = "stage1"
    """What trains and with which objectives (see ``ScMMGPT.set_trainable``)."""
    max_steps: int = 1000
    """Optimiser steps."""
    batch_size: int = 12
    """Cells per device per micro-batch (paper: 12 pre-training, 4 fine-tuning)."""
    grad_accum: int = 1
    """Micro-batches per optimiser step."""
    lr: float = 1e-5
    """Peak learning rate (paper: 1e-5)."""
    weight_decay: float = 0.001
    """AdamW weight decay (paper: 0.001)."""
    warmup_steps: int = 1000
    """Linear warm-up steps, then linear decay to 0 at ``max_steps``."""
    clip_grad: float | None = 1.0
    """Gradient norm clipping (``None``: off)."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """Autocast precision (bf16 on GPU, as the paper)."""
    seed: int = 0
    log_every: int = 10
    """Loss values are read (a device sync) only every ``log_every`` steps."""
    save_every: int | None = None
    """Checkpoint every N steps (and always at the end)."""
    out_dir: str | None = None
    """Folder for checkpoints, ``metrics.jsonl`` and ``train_config.json``."""
    num_workers: int = 0
    """DataLoader worker processes."""

    def __post_init__(self) -> None:
        if self.max_steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ConfigError("max_steps, batch_size and grad_accum must be >= 1.")
        if self.lr <= 0 or self.warmup_steps < 0:
            raise ConfigError("lr must be > 0 and warmup_steps >= 0.")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
