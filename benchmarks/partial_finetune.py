"""Fine-tuning on a few cell types: which side forgets the others, and what regularisers buy.

From one pre-trained stage-1 model (``PRE``, e.g. ``pretrained/`` of ``scmmgpt benchmark
annotation``), each variant fine-tunes 40 ``annotate`` steps on a fraction of the data's types, as
the annotation protocol does, and scores the test cells over all types through ``score_labels``
(seen and unseen types apart). The regularisers pull the fine-tuned model towards the pre-trained
one (the teacher, frozen) on each training batch:

* ``cell_anchor``: ``1 - cos`` between the student's and the teacher's query features of the
  batch's cells (feature-space L2-SP);
* ``text_anchor``: the same for the text features of the batch's descriptions and of the model's
  pre-training types (``config.trained_types``), as KgCoOp keeps learned prompts near the
  hand-written ones (Yao et al., CVPR 2023);
* ``distil``: KL divergence from the teacher's to the student's softmax over the pre-training
  types' texts, for each cell of the batch (ZSCL's feature distillation, Zheng et al., ICCV 2023).

``--cross`` also scores every fine-tuned model's cell features against the pre-trained model's
text features and the reverse: which tower's change moved the unseen types.

    python benchmarks/partial_finetune.py --pretrained PRE --data pbmc3k_clustifyr.h5ad --out out.json

Variants are ``NAME[:key=value+key=value]`` with keys of the regularisers above (weights) and
``train.*`` overrides, e.g. ``cell_anchor:cell_anchor=1`` or ``slow:train.lr_new=1e-4``.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
REGULARISERS = ("cell_anchor", "text_anchor", "distil")
DEFAULT_VARIANTS = ["plain", "no_ctm:train.losses=[ctc]", "cell_anchor:cell_anchor=1", "text_anchor:text_anchor=1",
                    "distil:distil=1", "distil_text:distil=1+text_anchor=1", "anchors10:cell_anchor=10+text_anchor=10",
                    "slow:train.lr_new=1e-4"]


def regularise(student, teacher, weights: dict[str, float]) -> None:
    """Add the weighted regularisers to ``student.net.forward_align``'s loss (this instance only)."""
    from scmmgpt.data.label_texts import candidate_labels
    from scmmgpt.modules.losses import similarity

    net, tnet = student.net, teacher.net
    ref = candidate_labels(labels=list(teacher.config.trained_types or []))
    ref_ids, ref_mask = teacher.tokenize_texts(ref.texts)
    with torch.no_grad():                          # the frozen teacher's texts: the same every step
        t_ref = tnet.encode_text(ref_ids, ref_mask)
    plain = net.forward_align

    def forward_align(batch, generator=None, losses=("ctc", "ctm")):
        out = plain(batch, generator, losses)
        cell = net.encode_cells(batch.gene_ids, batch.values, batch.padding_mask)
        ref_feats = net.encode_text(ref_ids, ref_mask)
        if weights.get("distil") or weights.get("cell_anchor"):
            with torch.no_grad():
                t_cell = tnet.encode_cells(batch.gene_ids, batch.values, batch.padding_mask)
        extra = out.loss.new_zeros(())
        if weights.get("distil"):
            temp = tnet.temperature
            s = F.log_softmax(similarity(cell.features, ref_feats) / temp, 1)
            t = F.log_softmax(similarity(t_cell.features, t_ref) / temp, 1)
            extra = extra + weights["distil"] * F.kl_div(s, t, log_target=True, reduction="batchmean")
        if weights.get("text_anchor"):
            own = net.encode_text(batch.text_input_ids, batch.text_attention_mask)
            with torch.no_grad():
                t_own = tnet.encode_text(batch.text_input_ids, batch.text_attention_mask)
            extra = extra + weights["text_anchor"] * ((1 - (ref_feats * t_ref).sum(-1)).mean()
                                                      + (1 - (own * t_own).sum(-1)).mean())
        if weights.get("cell_anchor"):
            extra = extra + weights["cell_anchor"] * (1 - (cell.features * t_cell.features).sum(-1)).mean()
        out.loss = out.loss + extra
        return out

    net.forward_align = forward_align


def _accuracy(pred, truth, seen) -> dict:
    return {"all": round(float(np.mean(pred == truth)), 4), "seen": round(float(np.mean(pred[seen] == truth[seen])), 4),
            "unseen": round(float(np.mean(pred[~seen] == truth[~seen])), 4) if (~seen).any() else None}


def main(argv=None) -> list:
    from finetune_rates import finetune_parser, fraction_split  # the same arguments and split
    from scmmgpt.data.label_texts import candidate_labels
    from scmmgpt.models.scmmgpt import ScMMGPT
    from scmmgpt.modules.losses import similarity
    from scmmgpt.train.loop import fit
    from scmmgpt.train.run import load_run_config

    p = finetune_parser(__doc__.splitlines()[0], [0.2], [0])
    p.add_argument("--variant", action="append", default=None, help=f"default: {' '.join(DEFAULT_VARIANTS)}")
    p.add_argument("--cross", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    teacher = ScMMGPT.from_pretrained(args.pretrained, with_lm=False)
    teacher.net.eval().requires_grad_(False)
    rows: list[dict] = []
    for frac in args.fractions:
        for seed in args.seeds:
            split = fraction_split(args.data, teacher, frac, seed)
            sub, labels, terms, truth, seen = split.sub, split.labels, split.terms, split.truth, split.seen
            test = sub.dataset("test", **teacher.reading)
            zero = teacher.score_labels(test, {x: terms[x] for x in labels}).scores
            row0 = {"frac": frac, "seed": seed, "variant": "zero_shot", "seen_types": sorted(sub.train_types),
                    **_accuracy(np.asarray(labels)[zero.argmax(1)], truth, seen)}
            rows.append(row0)
            print(json.dumps(row0), flush=True)
            for spec in args.variant or DEFAULT_VARIANTS:
                name, _, opts = spec.partition(":")
                pairs = [kv.split("=", 1) for kv in opts.split("+") if kv]
                weights = {k: float(v) for k, v in pairs if k in REGULARISERS}
                sets = [f"{k}={v}" for k, v in pairs if k not in REGULARISERS]
                cfg = load_run_config("cpu-small", [f"train.seed={seed}", "model.max_genes=128", *sets]).train
                cfg.stage, cfg.max_steps, cfg.progress, cfg.deterministic = "annotate", args.steps, False, True
                cfg.warmup_steps = max(1, args.steps // 10)
                ft = ScMMGPT.from_pretrained(args.pretrained, with_lm=False)
                if weights:
                    regularise(ft, teacher, weights)
                t = time.perf_counter()
                fit(ft, sub.dataset("train", **ft.reading), cfg)
                ft.net.__dict__.pop("forward_align", None)
                scores = ft.score_labels(test, {x: terms[x] for x in labels}).scores
                row = {"frac": frac, "seed": seed, "variant": name, "spec": spec,
                       **_accuracy(np.asarray(labels)[scores.argmax(1)], truth, seen),
                       "seconds": round(time.perf_counter() - t, 1)}
                if args.cross:
                    texts = candidate_labels(labels={x: terms[x] for x in labels}).texts
                    cells = {"tuned": ft.encode(test).features.float(), "pre": teacher.encode(test).features.float()}
                    text = {"tuned": ft.encode_texts(texts, precision="fp32"),
                            "pre": teacher.encode_texts(texts, precision="fp32")}
                    row["cross"] = {f"{c}_cells_{x}_texts": _accuracy(
                        np.asarray(labels)[similarity(cells[c], text[x]).argmax(1).numpy()], truth, seen)
                        for c in cells for x in text}
                rows.append(row)
                print(json.dumps(row), flush=True)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    Path(args.out).write_text(json.dumps({"command": "python benchmarks/partial_finetune.py " + " ".join(argv or []),
                                          "commit": commit, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
