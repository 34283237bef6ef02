"""Training configuration (paper Table 7 / appendix B.2 defaults)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from ..errors import ConfigError, check_config_keys
from ..utils.precision import PRECISIONS

#: Group-mean PCGen targets (:attr:`TrainConfig.pcgen_scale`): the mean of eq.-1 values, or the
#: mean on the counts scale.
PCGEN_SCALES = ("eq1", "counts")

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
    lr_new: float | None = None
    """Peak learning rate of randomly initialised weights (a fresh cell encoder, the Q-Former's
    cross-attention and queries, projections, LoRA); ``None``: ``lr``. The paper's 1e-5 assumes a
    pretrained scGPT encoder; from scratch, 1e-3 here vs 1e-4 for the BERT layers."""
    weight_decay: float = 0.001
    """AdamW weight decay (paper: 0.001)."""
    warmup_steps: int = 1000
    """Linear warm-up steps, then linear decay to 0 at ``max_steps``."""
    clip_grad: float | None = 1.0
    """Gradient norm clipping (``None``: off)."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Compute precision (:mod:`scmmgpt.utils.precision`): ``auto`` is bf16 mixed precision where the
    hardware has native bf16 matmul (a recent GPU; a CPU with AMX-BF16 or AVX512-BF16), else fp32.
    Trained weights and the optimiser state stay fp32. The resolved choice is what the run's
    ``train_config.json`` and ``run_config.yaml`` record."""
    seed: int = 0
    deterministic: bool = False
    """Deterministic kernels (``torch.use_deterministic_algorithms``): runs, and a resumed run vs an
    uninterrupted one, agree bit for bit. Off, they agree to floating-point reduction order
    (~1e-5 after a few steps) and some kernels are faster."""
    log_every: int = 10
    """Loss values are read (a device sync) only every ``log_every`` steps."""
    save_every: int | None = None
    """Checkpoint every N steps (and always at the end)."""
    out_dir: str | None = None
    """Folder for checkpoints, ``metrics.jsonl`` and ``train_config.json``."""
    num_workers: int = 0
    """DataLoader worker processes."""
    length_bucketing: bool | None = None
    """Batch cells of similar length (less padding). ``None``: off for the contrastive stages
    (stage1/annotate), whose in-batch negatives need mixed batches — cell length follows cell type,
    so length-sorted batches hold one type and CTC learns little — and on for the others."""
    balance: Literal["auto", "none", "type", "source", "source_type"] = "auto"
    """How batches are drawn (:class:`~scmmgpt.data.dataset.BalancedBatchSampler`): ``none`` takes
    cells as the data comes; ``source`` tempers the share of each source dataset of a shard folder
    (a corpus) by ``balance_power``, ``type`` that of each cell type, ``source_type`` both (a type's
    share inside its source). ``auto``: ``source_type`` when the training cells come from more than
    one source, else ``none``. Needs the cells' types (``fit(train_types=...)``) for the type kinds."""
    balance_power: float = 0.5
    """Exponent of :func:`~scmmgpt.data.dataset.balance_weights`: 1 samples as the data comes,
    0 makes every source (and every type in it) equally likely."""
    val_every: int | None = None
    """Validate every N steps (and at the end) when a validation set is given."""
    val_max_cells: int = 512
    """Cells of the validation set used per validation."""
    progress: bool = True
    """Show a progress bar (main process only)."""
    tensorboard: bool = False
    """Also write TensorBoard scalars under ``out_dir/tb`` (needs ``tensorboard``)."""
    t2c_warmup_steps: int = 0
    """stage2 / generate: before the joint steps, this many PCGen steps train the text-to-cell
    projector and cell decoder alone on cached LM states of the training descriptions
    (:func:`scmmgpt.train.warmup.warm_up_text_to_cell`; at ``lr_new``). Skipped when resuming."""
    t2c_warmup_batch: int = 32
    """Groups of cells (one description and source) per text-to-cell warm-up step; with no more
    groups than this, every step uses all of them (no sampling noise)."""
    t2c_final_steps: int = 0
    """stage2 / generate: after the last joint step, this many more warm-up steps re-fit the projector
    and decoder on the LM states the trained model now gives (its LoRA moved them; on pbmc3k 60 joint
    steps took pseudo-cells from 56% to 47% k-NN accuracy, and 200 such steps brought them back to
    56%). Not saved in the step checkpoints (like ``wise_alpha``), so a resumed run ends the same."""
    t2c_warmup_balanced: bool = True
    """Weight the warm-up's description groups equally (``False``: by their cell counts, eq. 6's
    gradient over all training cells; rare types then take longer to leave the average cell)."""
    pcgen_group_targets: bool = True
    """PCGen (eq. 6) compares each pseudo-cell with the mean profile of the training cells that share
    its description (and source) rather than with the sampled cell: every such cell gets the same
    pseudo-cell, so the expected gradient is the same and the noise of single cells is gone. Used
    when the distinct (description, source) groups number at most half the cells and their means
    fit in 1 GiB; otherwise each cell is its own target."""
    pcgen_scale: str = "counts"
    """The group means PCGen is fitted to (the text-to-cell fits, and the joint steps with
    ``pcgen_group_targets``): ``counts``, ``log1p(mean(expm1(x)))``, the expected profile of the
    group's reads, from which :func:`scmmgpt.tl.generate` draws cells; or ``eq1``, the mean of the
    cells' eq.-1 values (the optimum of eq. 6's squared error over single cells). Drawn into reads,
    the eq.-1 mean is the weaker profile: on pbmc3k, pseudo-cells fitted to it reached k-NN accuracy
    0.56 (its own ceiling 0.55), fitted to the counts scale 0.66, against 0.67 for the type means
    (``benchmarks/results/recipe/README.md``, "Pseudo-cells"). Joint steps without groups compare
    with single cells, on the eq.-1 scale."""
    gradient_checkpointing: bool = False
    """Recompute the cell encoder's (and the LM's) layer activations in the backward pass instead of
    storing them: much less activation memory for long cells (2048 genes), about a third more
    compute."""
    wise_alpha: float = 1.0
    """Task fine-tuning (annotate / describe / generate) only: the weights a run ends with are
    ``(1 - wise_alpha) * start + wise_alpha * trained`` for every parameter the task trains, where
    ``start`` is the model the run started from (WiSE-FT: Wortsman et al., "Robust fine-tuning of
    zero-shot models", CVPR 2022). 1 keeps the fine-tuned weights; below 1 keeps more of what the
    pre-trained model knew of types the fine-tuning data lacks."""
    losses: list[str] | None = None
    """Which of the stage's losses (:data:`~scmmgpt.models.stages.STAGES`) to compute: those named
    here, so one list serves every stage of a run configuration; ``None``: all of them. E.g.
    ``[ctc, cdgen, pcgen]`` trains stage 1 and annotation without CTM, which zero-shot scoring
    does not read (unless ``alpha > 0``) and which costs half of a stage-1 step
    (``benchmarks/results/recipe/README.md``, "CTM's share"). Weights that only a left-out loss
    reads (the CTM head; the LM projector; the text-to-cell projector and cell decoder) stay frozen."""
    compile: bool = False
    """``torch.compile`` the cell encoder and the Q-Former (dynamic shapes; in place, so weights and
    checkpoints keep their names). Pays off on long GPU runs; the first steps compile."""

    def __post_init__(self) -> None:
        if self.max_steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ConfigError("max_steps, batch_size and grad_accum must be >= 1.")
        if self.lr <= 0 or self.warmup_steps < 0 or (self.lr_new is not None and self.lr_new <= 0):
            raise ConfigError("lr and lr_new must be > 0 and warmup_steps >= 0.")
        if self.t2c_warmup_steps < 0 or self.t2c_final_steps < 0 or self.t2c_warmup_batch < 1:
            raise ConfigError("t2c_warmup_steps and t2c_final_steps must be >= 0 and t2c_warmup_batch >= 1.")
        if self.pcgen_scale not in PCGEN_SCALES:
            raise ConfigError(f"Unknown train.pcgen_scale {self.pcgen_scale!r}; choose from {', '.join(PCGEN_SCALES)}.")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"Unknown train.precision {self.precision!r}; choose from {', '.join(PRECISIONS)}.")
        if self.balance not in ("auto", "none", "type", "source", "source_type"):
            raise ConfigError(f"Unknown train.balance {self.balance!r}; choose from auto, none, type, source, "
                              "source_type.")
        if not 0.0 <= self.balance_power <= 1.0:
            raise ConfigError(f"train.balance_power must be in [0, 1], got {self.balance_power}.")
        stages = ("stage1", "stage2", "annotate", "describe", "generate")
        if self.stage not in stages:
            raise ConfigError(f"Unknown stage {self.stage!r}; choose from {stages}.")
        if self.losses is not None:
            from ..models.stages import stage_spec

            stage_spec(self.stage, self.losses)     # known names that leave the stage a loss, or a clear error
        if not 0.0 < self.wise_alpha <= 1.0:
            raise ConfigError(f"train.wise_alpha must be in (0, 1], got {self.wise_alpha}.")
        if self.wise_alpha < 1.0 and self.stage in ("stage1", "stage2"):
            raise ConfigError(f"train.wise_alpha={self.wise_alpha} interpolates a fine-tuned model with the one it "
                              f"started from; {self.stage} trains new weights from initialisation, so there is "
                              "nothing to interpolate with. Use it with stage annotate, describe or generate "
                              "(scmmgpt finetune), or leave it at 1.")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        if "mixed_precision" in d:
            raise ConfigError("train.mixed_precision is now train.precision: auto | fp32 | bf16 | fp16 "
                              f"(mixed_precision={d['mixed_precision']!r} -> precision="
                              f"{ {'no': 'fp32'}.get(d['mixed_precision'], d['mixed_precision'])!r}).")
        check_config_keys(cls, d, "training")
        return cls(**d)
