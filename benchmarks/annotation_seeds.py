"""Mean ± sd over seeds of ``scmmgpt benchmark annotation`` runs: Acc@1 of every method, zero-shot
and for each fine-tuning fraction (seen / unseen types), as one markdown table and one JSON.

    python benchmarks/annotation_seeds.py RUN_SEED0 RUN_SEED1 RUN_SEED2 --out summary.json

Each RUN is an output folder of the annotation protocol (its ``results.json``).
"""

import argparse
import json
from pathlib import Path

import numpy as np

METHODS = ("scmmgpt", "scmmgpt_gated", "scmmgpt_wise", "scmmgpt_zero_shot", "logreg_corpus", "logreg", "knn", "random")


def _cell(values: list[float]) -> str:
    if not values:
        return "–"
    v = 100 * np.asarray(values)
    return f"{v.mean():.1f} ± {v.std(ddof=1):.1f}" if len(v) > 1 else f"{v[0]:.1f}"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    recs = [json.loads((Path(r) / "results.json").read_text()) for r in args.runs]
    fractions = list(recs[0]["results"]["fine_tuned"])
    columns = [("zero_shot", None, "all")] + [("fine_tuned", f, part) for f in fractions
                                             for part in ("seen", "unseen") if not (float(f) == 1.0 and part == "unseen")]
    summary: dict = {"runs": args.runs, "seeds": [r["settings"]["seed"] for r in recs],
                     "commits": sorted({r["machine"].get("git_commit") for r in recs}), "acc1": {}}
    head = ["method", *[("zero-shot" if kind == "zero_shot" else f"ft {float(f):.0%} {part}") for kind, f, part in columns]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in METHODS:
        row, rec_m = [m], {}
        for kind, f, part in columns:
            vals = []
            for r in recs:
                block = r["results"][kind] if f is None else r["results"][kind][f]
                if m in block and block[m].get(part) is not None:
                    vals.append(block[m][part]["acc@1"])
            rec_m[" ".join(x for x in (kind, f, part) if x)] = vals
            row.append(_cell(vals))
        if any(rec_m.values()):
            summary["acc1"][m] = rec_m
            lines.append("| " + " | ".join(row) + " |")
    print("\n".join(lines))
    summary["table"] = "\n".join(lines)
    Path(args.out).write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
