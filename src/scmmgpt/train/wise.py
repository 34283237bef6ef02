"""Weight-space ensembles of a fine-tuned model and the model it started from (WiSE-FT).

Wortsman et al., "Robust fine-tuning of zero-shot models" (CVPR 2022): fine-tuning a zero-shot
model on a few classes gains on them and loses on the rest; the linear interpolation of the two
weight sets, ``theta = (1 - alpha) * theta_start + alpha * theta_fine_tuned``, keeps most of both.
Here it lets a model fine-tuned on some cell types keep annotating the types it was not shown.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..errors import ConfigError

__all__ = ["trained_snapshot", "interpolate"]


def trained_snapshot(net: torch.nn.Module, stage: str) -> dict[str, torch.Tensor]:
    """Copies of the parameters ``stage`` trains (``net.set_trainable(stage)``), as they are now."""
    net.set_trainable(stage)
    return {name: p.detach().clone() for name, p in net.named_parameters() if p.requires_grad}


@torch.no_grad()
def interpolate(net: torch.nn.Module, start: Mapping[str, torch.Tensor], alpha: float) -> None:
    """In place: every parameter of ``net`` named in ``start`` becomes
    ``(1 - alpha) * start[name] + alpha * itself``; the others are left as they are."""
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"WiSE-FT alpha must be in [0, 1], got {alpha}.")
    params = dict(net.named_parameters())
    missing = sorted(set(start) - set(params))
    if missing:
        raise ConfigError(f"The start weights name {len(missing)} parameters this network lacks "
                          f"(first: {missing[0]}); interpolate a model with the model it was fine-tuned from.")
    for name, value in start.items():
        p = params[name]
        if p.shape != value.shape:
            raise ConfigError(f"Parameter {name}: shape {tuple(p.shape)} here, {tuple(value.shape)} in the start weights.")
        p.lerp_(value.to(device=p.device, dtype=p.dtype), 1.0 - alpha)
