"""The demo's run-to-run spread: ``scmmgpt demo`` once per seed, every figure beside its reference.

Each seed is a whole demo run (its own stratified split, so its own held-out test cells and its own
references fitted on its own training cells). Prints one row per seed and mean ± sd and range
(max - min) over seeds, and writes ``benchmarks/results/demo/seeds.json`` (with the command and
commit). Issue 18 asks for a zero-shot Acc@1 range of at most 0.05 over 3 seeds.

Run: ``python benchmarks/demo_seeds.py --seeds 0 1 2`` (about 9 min a seed on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

#: (name, path into metrics.json)
FIGURES = (
    ("acc1", ("annotation", "acc1")), ("acc3", ("annotation", "acc3")), ("macro_f1", ("annotation", "macro_f1")),
    ("lr_acc1", ("reference", "logistic_regression", "acc1")),
    ("lr_macro_f1", ("reference", "logistic_regression", "macro_f1")),
    ("bleu2", ("description", "bleu2")), ("type_named", ("description", "type_named")),
    ("lr_type_named", ("reference", "logistic_regression_description", "type_named")),
    ("knn", ("generation", "knn_accuracy")), ("type_mean_knn", ("reference", "type_mean_generation", "knn_accuracy")),
    ("seconds", ("seconds", "total")),
)


def _get(d: dict, path: tuple[str, ...]) -> float:
    for k in path:
        d = d[k]
    return float(d)  # type: ignore[arg-type]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "demo"))
    ap.add_argument("--work", default="/tmp/scmmgpt-demo-seeds", help="where each seed's demo report goes")
    a = ap.parse_args()
    from scmmgpt.tasks.demo import run_demo

    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True).stdout.strip())
    record: dict = {"command": " ".join(["python", "benchmarks/demo_seeds.py", *sys.argv[1:]]), "commit": commit,
                    "uncommitted_changes": dirty, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "runs": []}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for s in a.seeds:
        m = run_demo(out=f"{a.work}/seed{s}", seed=s, progress=False)
        row = {"seed": s, **{name: round(_get(m, path), 4) for name, path in FIGURES}}
        record["runs"].append(row)
        print(" ".join(f"{k} {v}" for k, v in row.items()), flush=True)
        (out / "seeds.json").write_text(json.dumps(record, indent=1))
    summary = {}
    for name, _ in FIGURES:
        v = np.array([r[name] for r in record["runs"]])
        summary[name] = {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                         "range": float(v.max() - v.min())}
    record["summary"] = summary
    (out / "seeds.json").write_text(json.dumps(record, indent=1))
    for name, st in summary.items():
        print(f"{name:14s} {st['mean']:.3f} ± {st['sd']:.3f}  range {st['range']:.3f}")


if __name__ == "__main__":
    main()
