"""The training stages and tasks of scMMGPT (paper §3.4) as one typed table.

Every decision that depends on "which stage is this" reads :data:`STAGES`: which submodules train
(:meth:`~scmmgpt.models.network.ScMMGPTNetwork.set_trainable`), which losses the forward pass
computes, whether the text LM must be loaded, whether batches are drawn at random (contrastive
losses need mixed batches) or by length, and whether the text-to-cell warm-up may run.

The table lives in the model layer because the network's ``forward`` and ``set_trainable`` read
it; the training code (``scmmgpt.train``) reads the same entries.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from ..errors import ConfigError

__all__ = ["StageSpec", "STAGES", "StageName", "stage_spec", "SUBMODULES", "LOSSES", "ONLY_FOR"]

StageName = Literal["stage1", "stage2", "annotate", "describe", "generate"]

#: Submodule groups a stage can train. ``lora`` is the LM's LoRA adapters (the base LM never trains).
SUBMODULES = ("cell_encoder", "qformer", "align_heads", "lm_proj", "text_to_cell", "cell_decoder", "lora")
#: Losses a stage can compute (paper eq. 2, 3, 5, 6).
LOSSES = ("ctc", "ctm", "cdgen", "pcgen")
#: Weights that only one loss reads: frozen when a stage leaves that loss out (``train.losses``),
#: so no trained weight goes without a gradient (which DDP refuses).
ONLY_FOR = {"ctm": ("ctm_head",), "cdgen": ("lm_proj",), "pcgen": ("text_to_cell", "cell_decoder")}


@dataclass(frozen=True)
class StageSpec:
    """What one stage or task fine-tuning does."""

    name: str
    """The stage's name (``TrainConfig.stage``)."""
    trains: frozenset[str]
    """Submodule groups that train (of :data:`SUBMODULES`); everything else is frozen."""
    losses: tuple[str, ...]
    """Losses computed by the forward pass and summed (of :data:`LOSSES`)."""
    warm_up_text_to_cell: bool = False
    """The text-to-cell projector may first learn PCGen alone on cached LM states
    (``train.t2c_warmup_steps``)."""

    def __post_init__(self) -> None:
        unknown = (set(self.trains) - set(SUBMODULES)) | (set(self.losses) - set(LOSSES))
        if unknown:
            raise ConfigError(f"Stage {self.name!r} names unknown parts {sorted(unknown)}.")
        if not self.losses:
            raise ConfigError(f"Stage {self.name!r} computes no loss.")

    @property
    def align(self) -> bool:
        """Computes the contrastive/matching losses (CTC, CTM)."""
        return bool({"ctc", "ctm"} & set(self.losses))

    @property
    def needs_lm(self) -> bool:
        """Needs the text LM: a generative loss runs through it."""
        return bool({"cdgen", "pcgen"} & set(self.losses))

    @property
    def random_batches(self) -> bool:
        """Batches are drawn at random: CTC's in-batch negatives need mixed cell types, and cell
        length follows cell type, so length-sorted batches would hold one type. The generative
        stages batch by length (less padding)."""
        return self.align


_ALIGN = frozenset({"cell_encoder", "qformer", "align_heads"})

#: Paper §3.4: stage 1 aligns (CTC + CTM), stage 2 generates (CDGen + PCGen) with the cell side
#: frozen; each task fine-tuning keeps the objective of its task.
STAGES: dict[str, StageSpec] = {
    "stage1": StageSpec("stage1", _ALIGN, ("ctc", "ctm")),
    "annotate": StageSpec("annotate", _ALIGN, ("ctc", "ctm")),
    "stage2": StageSpec("stage2", frozenset({"lm_proj", "text_to_cell", "cell_decoder", "lora"}), ("cdgen", "pcgen"),
                        warm_up_text_to_cell=True),
    "describe": StageSpec("describe", frozenset({"lm_proj", "lora"}), ("cdgen",)),
    "generate": StageSpec("generate", frozenset({"text_to_cell", "cell_decoder", "lora"}), ("pcgen",),
                          warm_up_text_to_cell=True),
}


def stage_spec(stage: str | StageSpec, losses: Sequence[str] | None = None) -> StageSpec:
    """The :class:`StageSpec` of a stage name (a spec is returned as it is).

    ``losses`` (``train.losses``) keeps only those of the stage's losses: one list can serve every
    stage of a run configuration (``[ctc, cdgen, pcgen]``: stage 1 without CTM, stage 2 as it is).
    Names outside :data:`LOSSES`, or a list that leaves the stage nothing to compute, are errors.
    """
    if isinstance(stage, StageSpec):
        spec = stage
    else:
        try:
            spec = STAGES[stage]
        except KeyError:
            raise ConfigError(f"Unknown stage {stage!r}; choose from {list(STAGES)}.") from None
    if losses is None:
        return spec
    if isinstance(losses, str) or set(losses) - set(LOSSES):
        raise ConfigError(f"train.losses={losses!r} must be a list of losses from {list(LOSSES)}, "
                          f"e.g. --set 'train.losses=[ctc, cdgen, pcgen]'.")
    kept = tuple(x for x in spec.losses if x in set(losses))       # in the stage's own order
    if not kept:
        raise ConfigError(f"train.losses={list(losses)} leaves stage {spec.name!r} nothing to compute: it computes "
                          f"{list(spec.losses)}; name at least one of them.")
    return spec if kept == spec.losses else dataclasses.replace(spec, losses=kept)
