"""Which novelty gate: the embedding it reads and its quantile (``scmmgpt.models.gate``).

For each pre-trained model and split seed, fine-tunes 40 ``annotate`` steps on a fraction of the
data's types (the annotation protocol's fine-tuning), then scores the test cells over all types:
zero-shot, plain fine-tuned, and routed through a gate calibrated on the validation cells
(:func:`~scmmgpt.models.gate.calibrate_gate`) in either the pre-trained model's embedding (``pre``,
what fine-tuning records) or the fine-tuned model's (``tuned``), at several quantiles; and the
oracle, which routes every cell by its true seen / unseen status (the ceiling of any gate).

    python benchmarks/gate_variants.py --pretrained PRE0 PRE1 PRE2 --data pbmc3k_clustifyr.h5ad --out out.json

``--pretrained`` gives one model per split seed (``--seeds``, default 0 1 2), e.g. the protocol's
``pretrained/`` folder of each seed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
QUANTILES = (0.02, 0.05, 0.1)


def _accuracy(pred, truth, seen) -> list[float]:
    return [round(float(np.mean(pred[seen] == truth[seen])), 4), round(float(np.mean(pred[~seen] == truth[~seen])), 4)]


def main(argv=None) -> list:
    from finetune_rates import fraction_split
    from scmmgpt.models.gate import calibrate_gate, route_scores
    from scmmgpt.models.scmmgpt import ScMMGPT
    from scmmgpt.train.loop import fit
    from scmmgpt.train.run import load_run_config

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pretrained", nargs="+", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if len(args.pretrained) != len(args.seeds):
        p.error("give one --pretrained model per seed")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for pre_path, seed in zip(args.pretrained, args.seeds):
        pre = ScMMGPT.from_pretrained(pre_path, with_lm=False)
        for frac in args.fractions:
            t = time.perf_counter()
            sp = fraction_split(args.data, pre, frac, seed)
            sub, truth, seen = sp.sub, sp.truth, sp.seen
            names = np.asarray(sp.labels)
            labels = {x: sp.terms[x] for x in sp.labels}
            test, train = sub.dataset("test", **pre.reading), sub.dataset("train", **pre.reading)
            val = sub.dataset("val", **pre.reading)
            zero = torch.from_numpy(pre.score_labels(test, labels).scores)
            gates = {"pre": calibrate_gate(pre, train, sub.types("train"), val=val, terms=sub.label_set())}
            cfg = load_run_config("cpu-small", [f"train.seed={seed}", "model.max_genes=128"]).train
            cfg.stage, cfg.max_steps, cfg.progress, cfg.deterministic = "annotate", args.steps, False, True
            cfg.warmup_steps = max(1, args.steps // 10)
            ft = ScMMGPT.from_pretrained(pre_path, with_lm=False)
            fit(ft, sub.dataset("train", **ft.reading), cfg)
            tuned = torch.from_numpy(ft.score_labels(test, labels).scores)
            gates["tuned"] = calibrate_gate(ft, train, sub.types("train"), val=val, terms=sub.label_set())
            emb = {"pre": pre.encode(test).embedding(), "tuned": ft.encode(test).embedding()}
            cols = gates["pre"].seen_labels(list(names), [sp.terms[x] for x in names])
            row = {"seed": seed, "frac": frac, "seen_types": sorted(sub.train_types), "n_seen": int(seen.sum()),
                   "n_unseen": int((~seen).sum()), "zero_shot": _accuracy(names[zero.argmax(1).numpy()], truth, seen),
                   "fine_tuned": _accuracy(names[tuned.argmax(1).numpy()], truth, seen),
                   "oracle": _accuracy(names[route_scores(tuned, zero, cols, seen).argmax(1).numpy()], truth, seen)}
            for space, gate in gates.items():
                cells = val if gate.calibrated_on == "validation" else train         # as calibrate_gate reads them
                held = gate.scores((pre if space == "pre" else ft).encode(cells).embedding())
                held = held[np.isfinite(held)]
                for q in QUANTILES:
                    gate.threshold = float(np.quantile(held, q))
                    known = gate.known(emb[space])
                    pred = names[route_scores(tuned, zero, cols, known).argmax(1).numpy()]
                    row[f"gate_{space}_q{q:g}"] = _accuracy(pred, truth, seen) + [
                        round(float(known[seen].mean()), 4), round(float((~known[~seen]).mean()), 4)]
            row["seconds"] = round(time.perf_counter() - t, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    keys = [k for k in rows[0] if k in ("zero_shot", "fine_tuned", "oracle") or k.startswith("gate_")]
    summary = {k: {"seen": round(float(np.mean([r[k][0] for r in rows])), 4),
                   "unseen": round(float(np.mean([r[k][1] for r in rows])), 4),
                   "splits_meeting_target": int(sum(r[k][0] >= 0.85 and r[k][1] >= r["zero_shot"][1] for r in rows))}
               for k in keys}
    for k, v in summary.items():
        print(f"{k:18s} seen {v['seen']:.3f} unseen {v['unseen']:.3f} target met on {v['splits_meeting_target']}")
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    Path(args.out).write_text(json.dumps({"command": "python benchmarks/gate_variants.py " + " ".join(argv or []),
                                          "commit": commit, "rows": rows, "summary": summary}, indent=1))
    return rows


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
