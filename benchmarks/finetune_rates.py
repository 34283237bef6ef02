"""Learning rates of an annotate fine-tuning from a pre-trained ``cpu-small`` model.

Three ways to set the rates of a fine-tuning run, each from the same pre-trained stage-1 model,
on the same cells and over several fine-tuning seeds:

* ``A``: every trained weight at ``lr`` (1e-4): what ``param_groups`` did before 2026-12-07, when a
  reloaded model had no randomly initialised weights left;
* ``B``: every weight at 1e-3;
* ``C``: pre-training's split, kept after reloading: weights copied from BERT at ``lr``, those the
  model's lineage started from random initialisation at ``lr_new`` (3e-3), what
  ``ScMMGPT.param_groups`` does now (``scratch_parameters``).

Test-cell Acc@1 over all of the data's types (``score_labels``, as ``tl.annotate``), for fine-tuning on
all types and on a fraction of them (seen / unseen types reported apart). Writes a JSON list.

    python benchmarks/finetune_rates.py --pretrained PRE --data pbmc3k_clustifyr.h5ad --out results.json

``PRE`` is a stage-1 model, e.g. ``pretrained/`` of ``scmmgpt benchmark annotation`` (the suite's:
soupx_pbmc4k, 150 steps, ``model.max_genes=128``).
"""

import argparse
import json
import time
from types import SimpleNamespace

import numpy as np
import torch


def finetune_parser(description: str, fractions: list[float], seeds: list[int]) -> argparse.ArgumentParser:
    """The arguments of the fine-tuning experiments (this script and ``partial_finetune.py``)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--pretrained", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--fractions", type=float, nargs="+", default=fractions)
    p.add_argument("--seeds", type=int, nargs="+", default=seeds)
    p.add_argument("--threads", type=int, default=None)
    return p


def fraction_split(data: str, model, frac: float, split_seed: int) -> SimpleNamespace:
    """The protocol's 70/10/20 split of ``data`` with a ``frac`` of its types trained, read in
    ``model``'s vocabulary: the cells (``sub``), every type (``labels``) with its CL term
    (``terms``), and the test cells' types (``truth``) and whether they were trained (``seen``)."""
    from scmmgpt.data.labelled import DataConfig, load_labelled

    sub = load_labelled(DataConfig(path=data, split=(0.7, 0.1, 0.2), seed=split_seed, types_fraction=frac),
                        vocab=model.vocab, target_sum=model.config.target_sum)
    desc = sub.descriptions
    truth = desc["cell_type"].astype(str).to_numpy()[sub.split["test"]]
    return SimpleNamespace(sub=sub, labels=sorted({str(t) for t in desc["cell_type"]}),
                           terms={str(t): str(i) for t, i in zip(desc["cell_type"], desc["cell_type_id"])},
                           truth=truth, seen=np.isin(truth, list(sub.train_types)))


def main(argv=None) -> list:
    from scmmgpt.models.scmmgpt import ScMMGPT
    from scmmgpt.train.loop import fit
    from scmmgpt.train.run import load_run_config

    p = finetune_parser(__doc__.splitlines()[0], [1.0, 0.2], [0, 1, 2])
    p.add_argument("--set", dest="overrides", action="append", default=["model.max_genes=128"])
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    base = ScMMGPT.from_pretrained(args.pretrained, with_lm=False)
    # the weights a new model of this configuration initialises at random: pre-training's lr_new group
    scratch = ScMMGPT.build(base.config, base.vocab, with_lm=False).fresh_parameters
    rows = []
    for frac in args.fractions:
        split = fraction_split(args.data, base, frac, 0)
        sub, labels, id_of, truth, seen = split.sub, split.labels, split.terms, split.truth, split.seen
        for seed in args.seeds:
            for variant in ("A", "B", "C"):
                rc = load_run_config("cpu-small", [f"train.seed={seed}", *args.overrides])
                cfg = rc.train
                cfg.stage, cfg.max_steps, cfg.progress, cfg.deterministic = "annotate", args.steps, False, True
                cfg.warmup_steps = max(1, args.steps // 10)
                ft = ScMMGPT.from_pretrained(args.pretrained, with_lm=False)
                ft.scratch_parameters = set(scratch) if variant == "C" else set()
                if variant == "B":
                    cfg.lr, cfg.lr_new = 1e-3, 1e-3
                t = time.perf_counter()
                fit(ft, sub.dataset("train", **ft.reading), cfg)
                scores = ft.score_labels(sub.dataset("test", **ft.reading), {x: id_of[x] for x in labels}).scores
                pred = np.asarray(labels)[scores.argmax(1)]
                row = {"frac": frac, "seed": seed, "variant": variant, "all": float(np.mean(pred == truth)),
                       "seen": float(np.mean(pred[seen] == truth[seen])),
                       "unseen": float(np.mean(pred[~seen] == truth[~seen])) if (~seen).any() else None,
                       "s": round(time.perf_counter() - t)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    with open(args.out, "w") as fh:
        json.dump({"command": "python benchmarks/finetune_rates.py " + " ".join(argv or []), "rows": rows}, fh, indent=1)
    return rows


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
