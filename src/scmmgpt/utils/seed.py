"""Local random state: seeded work that leaves the caller's global RNGs as they were."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

__all__ = ["seeded"]


@contextlib.contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Inside, torch's global RNG (and every CUDA device's) is seeded with ``seed``; on exit the
    states from before are restored. ``None``: no change at all."""
    if seed is None:
        yield
        return
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
