"""Stage-1 recipe experiments: which settings make the cell and text towers align, measured.

Each variant is a list of ``section.key=value`` overrides on the packaged ``cpu-small`` run
configuration. For every variant and seed, a fresh model trains stage 1 on the seed's training
split and is scored on that split's held-out test cells every ``--val-every`` steps: zero-shot
Acc@1 through ``ScMMGPT.score_labels`` (the path of ``tl.annotate``), and the CTC loss on its
training batches (its plateau is ``ln(batch_size)``: sims that do not depend on the pair). The
reference, a logistic regression on the same training cells' log-normalised expression, is fitted
in the same run on the same split. ``--init-stats`` also prints how alike the towers' features
are at initialisation (mean off-diagonal cosine over one batch).

Tuning seeds are not the demo's seed 0: the demo's held-out cells never choose a setting.

Run: ``python benchmarks/recipe.py NAME --variant base: --variant lr1e-3:train.lr_new=1e-3 --seeds 1 2 3``;
writes ``benchmarks/results/recipe/NAME.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def _offdiag_cos(x) -> float:
    import torch

    x = torch.nn.functional.normalize(x.flatten(1).float(), dim=-1)
    c = x @ x.t()
    n = len(c)
    return float((c.sum() - c.diag().sum()) / (n * n - n))


def init_stats(model, ds, n: int = 16) -> dict:
    """Mean off-diagonal cosine, over ``n`` training cells, of each tower's features at this point."""
    import torch

    from scmmgpt.inference import iter_batches
    from scmmgpt.modules.attention import masked_mean
    from scmmgpt.modules.losses import similarity

    net = model.net
    net.eval()
    idx = np.linspace(0, len(ds) - 1, n).astype(int)
    with torch.no_grad():
        b = next(iter(iter_batches(model, ds, n, with_text=True, indices=idx)))
        cell = net.encode_cells(b.gene_ids, b.values, b.padding_mask)
        h = net.qformer.forward_text(b.text_input_ids, b.text_attention_mask)
        text = net.encode_text(b.text_input_ids, b.text_attention_mask)
        sim = similarity(cell.features, text)
    return {"cell_query": _offdiag_cos(cell.query), "cell_features": _offdiag_cos(cell.features),
            "text_cls_state": _offdiag_cos(h[:, 0]), "text_mean_state": _offdiag_cos(masked_mean(h, b.text_attention_mask.bool())),
            "text_features": _offdiag_cos(text), "sim_sd_over_texts": float(sim.std(1).mean()),
            "distinct_texts": len(set(b.texts))}


def run_one(overrides: list[str], seed: int, data: str | None, val_every: int, stats: bool) -> dict:
    from scmmgpt.baselines.reference import logistic_regression_reference
    from scmmgpt.data.labelled import DataConfig, load_labelled
    from scmmgpt.models.scmmgpt import ScMMGPT
    from scmmgpt.train.loop import fit
    from scmmgpt.train.run import load_run_config
    from scmmgpt.utils.seed import seeded

    rc = load_run_config("cpu-small", [f"train.seed={seed}", *overrides])
    lab = load_labelled(DataConfig(path=data, split=(0.7, 0.1, 0.2), seed=seed), target_sum=rc.model.target_sum)
    with seeded(seed):
        model = ScMMGPT.build(rc.model, lab.vocab, with_lm=False)
    cfg = rc.train
    cfg.stage, cfg.progress, cfg.val_every = "stage1", False, val_every
    train = lab.dataset("train", **model.reading)
    out = {"seed": seed, "init": init_stats(model, train) if stats else None}
    test = lab.dataset("test", **model.reading)
    t0 = time.perf_counter()
    r = fit(model, train, cfg, val=test, val_labels=lab.types("test"), label_terms=lab.label_set(),
            measured=lab.cells.measured)
    out.update(seconds=round(time.perf_counter() - t0, 1),
               acc1=[(h["step"], round(h["val_acc1"], 4)) for h in r["history"] if "val_acc1" in h],
               ctc=[(h["step"], round(h["ctc"], 4)) for h in r["history"] if "ctc" in h],
               final_acc1=round(r["validation"]["val_acc1"], 4), logistic_regression=round(logistic_regression_reference(lab, seed=seed)["acc1"], 4))
    return out


def parse_variants(specs: list[str]) -> dict[str, list[str]]:
    """``["NAME:k=v,k=v", ...]`` -> ``{NAME: ["k=v", "k=v"]}`` (empty overrides allowed)."""
    variants = {}
    for v in specs:
        name, _, ov = v.partition(":")
        variants[name] = [o for o in ov.split(",") if o]
    return variants


def new_record(name: str, script: str, data: str | None, seeds: list[int]) -> dict:
    """An experiment's JSON record before its variants: the command, data, seeds, commit and date."""
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {"experiment": name, "command": " ".join(["python", f"benchmarks/{script}", *sys.argv[1:]]),
            "data": data or "pbmc68k_reduced", "seeds": seeds, "commit": commit,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "variants": {}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("name")
    ap.add_argument("--variant", action="append", required=True, help="NAME:k=v,k=v (empty overrides allowed)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--data", default=None, help="an .h5ad (default: the bundled pbmc68k_reduced)")
    ap.add_argument("--val-every", type=int, default=50)
    ap.add_argument("--init-stats", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "recipe"))
    a = ap.parse_args()
    variants = parse_variants(a.variant)
    record = new_record(a.name, "recipe.py", a.data, a.seeds)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, ov in variants.items():
        runs = [run_one(ov, s, a.data, a.val_every, a.init_stats) for s in a.seeds]
        acc = np.array([r["final_acc1"] for r in runs])
        sd = float(acc.std(ddof=1)) if len(acc) > 1 else 0.0
        record["variants"][name] = {"overrides": ov, "runs": runs, "acc1_mean": float(acc.mean()), "acc1_sd": sd}
        print(f"{name:24s} Acc@1 {acc.mean():.3f} ± {sd:.3f}  per seed {acc.tolist()}  "
              f"LR {[r['logistic_regression'] for r in runs]}", flush=True)
        # written after every variant: an interrupted experiment keeps what it measured
        (out / f"{a.name}.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
