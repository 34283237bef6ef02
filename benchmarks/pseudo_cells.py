"""Why pseudo-cells lagged the type means: the text-to-cell side of a trained model, re-fitted.

Takes a model saved by the generative protocol (``benchmarks/results/paper/<run>/model``, trained on
pbmc3k's training split of the same ``--seed``) and scores pseudo-cells as Table 2 does (10 per
type, reads drawn at the test cells' median library size, k-NN k=5 in a PCA of the real test
cells; mean over 3 drawing seeds):

1. the model as saved, and the references: each type's mean profile on the counts scale (the
   protocol's reference) and the mean of its eq.-1 values (what eq. 6's squared error trains the
   generator towards), both drawn into reads and as profiles;
2. the projector and decoder re-initialised, then ``--warmup-steps`` text-to-cell warm-up steps
   (:func:`scmmgpt.train.warmup.warm_up_text_to_cell`, balanced or by cell counts);
3. ``--stage2-steps`` joint stage-2 steps (CDGen + PCGen, LoRA trained, batch 8, as the protocol);
4. ``--final-steps`` more text-to-cell steps on the LM states the joint steps left.

After each step it also reports each type's correlation with the eq.-1 mean profile (both centred
on the average over types) and the mean squared distance to it.

Run: ``python benchmarks/pseudo_cells.py --model benchmarks/results/paper/generative_rerun/model
--out benchmarks/results/recipe/pseudo_cells.json`` (about 10 min on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "pbmc3k_clustifyr.h5ad"))
    ap.add_argument("--seed", type=int, default=0, help="the split seed the model was trained with")
    ap.add_argument("--warmup-steps", type=int, default=600)
    ap.add_argument("--stage2-steps", type=int, default=60)
    ap.add_argument("--final-steps", type=int, default=200)
    ap.add_argument("--by-counts", action="store_true", help="weight description groups by cell count")
    ap.add_argument("--scale", choices=("eq1", "counts"), default="eq1", help="train.pcgen_scale")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)

    from scmmgpt.baselines.reference import type_mean_profiles
    from scmmgpt.data.label_texts import candidate_labels
    from scmmgpt.data.labelled import DataConfig, load_labelled
    from scmmgpt.eval.cells import expression_pca, knn_accuracy_table
    from scmmgpt.models.scmmgpt import ScMMGPT
    from scmmgpt.models.stages import stage_spec
    from scmmgpt.tasks.generative import _library_sizes
    from scmmgpt.tl.generate import sample_cells
    from scmmgpt.train.loop import _measured_for, fit
    from scmmgpt.train.run import load_run_config
    from scmmgpt.train.warmup import warm_up_text_to_cell

    t_start = time.perf_counter()
    model = ScMMGPT.from_pretrained(a.model)
    lab = load_labelled(DataConfig(path=a.data, label_key="cell_type", split=(0.7, 0.1, 0.2), seed=a.seed),
                        target_sum=model.config.target_sum)
    tr, test = lab.split["train"], lab.split["test"]
    types = lab.types()
    cands = candidate_labels(labels=lab.label_set())
    labels, text = list(cands.names), dict(zip(cands.names, cands.texts))
    meas = lab.cells.measured
    real = lab.cells.rows_csr(test).toarray()[:, meas]
    pca = expression_pca(real, 50, seed=a.seed)
    lib = int(np.median(_library_sizes(lab, test)))
    n = 10
    prompted = np.repeat(labels, n)
    tr_expr = lab.cells.rows_csr(tr)
    refs = {"type_mean_counts": type_mean_profiles(tr_expr, types[tr], labels),
            "type_mean_eq1": type_mean_profiles(tr_expr, types[tr], labels, scale="log")}

    def knn(profile: np.ndarray, draw: bool = True) -> float:
        rep = np.repeat(profile, n, axis=0)
        runs = [(sample_cells(rep, model.config.target_sum, lib, np.random.default_rng(s))[1] if draw else rep)[:, meas]
                for s in (0, 1, 2)]
        return knn_accuracy_table(real, types[test], runs, prompted, ks=(5,), transform=pca)[5]["mean"]

    def score(step: str) -> dict:
        prof = model.generate_cells([text[x] for x in labels], precision="fp32")
        a_ = prof[:, meas] - prof[:, meas].mean(0)
        b_ = refs["type_mean_eq1"][:, meas] - refs["type_mean_eq1"][:, meas].mean(0)
        rec = {"step": step, "knn5": round(knn(prof), 4),
               "corr_with_eq1_mean": {lab_: round(float(np.corrcoef(a_[i], b_[i])[0, 1]), 3)
                                      for i, lab_ in enumerate(labels)},
               "mse_to_eq1_mean": round(float(((prof[:, meas] - refs["type_mean_eq1"][:, meas]) ** 2).mean()), 5)}
        print(json.dumps(rec), flush=True)
        return rec

    out: dict = {"command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
                 "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                          text=True).stdout.strip(),
                 "settings": vars(a), "library_size": lib,
                 "references": {k: {"knn5_drawn": round(knn(v), 4), "knn5_profile": round(knn(v, draw=False), 4)}
                                for k, v in refs.items()},
                 "steps": [score("as saved")]}
    print(json.dumps(out["references"]), flush=True)

    net = model.net
    torch.manual_seed(a.seed)
    for m in [*net.text_to_cell.modules(), *net.cell_decoder.modules()]:
        if m is not net.text_to_cell and m is not net.cell_decoder and hasattr(m, "reset_parameters"):
            m.reset_parameters()
    with torch.no_grad():
        net.text_to_cell.cell_queries.normal_(0, 0.02)
        for p in (net.cell_decoder.gene_out, net.cell_decoder.bias, net.cell_decoder.gene_pooled):
            if p is not None:
                p.zero_()
    out["steps"].append(score("re-initialised"))
    ds = lab.dataset("train", with_targets=True, **model.reading)
    net.set_trainable(stage_spec("generate"))
    masks, group = _measured_for("by_source", ds, model.device)
    kw = dict(lr=a.lr, measured=masks, measured_group=group, balanced=not a.by_counts, scale=a.scale)
    w = warm_up_text_to_cell(model, ds, steps=a.warmup_steps, seed=a.seed, **kw)
    out["steps"].append({**score(f"warm-up {a.warmup_steps}"), "fit": w})
    if a.stage2_steps:
        rc = load_run_config("cpu-small", [f"train.seed={a.seed}"])
        cfg = type(rc.train).from_dict({**rc.train.to_dict(), "stage": "stage2", "max_steps": a.stage2_steps,
                                        "batch_size": 8, "lr_new": a.lr, "t2c_warmup_steps": 0, "t2c_final_steps": 0,
                                        "warmup_steps": max(1, a.stage2_steps // 10), "progress": False, "pcgen_scale": a.scale,
                                        "val_every": None, "out_dir": None, "deterministic": True})
        fit(model, ds, cfg, measured="by_source", train_types=lab.types("train"))
        out["steps"].append(score(f"joint stage 2, {a.stage2_steps} steps"))
    if a.final_steps:
        net.set_trainable(stage_spec("generate"))
        w = warm_up_text_to_cell(model, ds, steps=a.final_steps, seed=a.seed + 1, **kw)
        out["steps"].append({**score(f"final text-to-cell fit {a.final_steps}"), "fit": w})
    out["seconds"] = round(time.perf_counter() - t_start, 1)
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
