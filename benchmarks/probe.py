"""Where does zero-shot annotation lose accuracy? Linear probes along the cell side, measured.

For each seed a fresh ``cpu-small`` model trains stage 1 on the seed's training split (as
``recipe.py`` does), and the held-out test cells are then classified in five ways, each fitted on
the training cells only:

- ``lr_expression``: logistic regression on log-normalised expression (the demo's reference);
- ``lr_tokens``: logistic regression on what the cell encoder is given: the ``max_genes`` tokens
  of each cell (their values, binned when the model bins) scattered back to a cells x genes
  matrix, zeros elsewhere. Its gap to ``lr_expression`` is what the tokenisation loses;
- ``lr_cls`` / ``lr_query``: logistic regression on the trained cell encoder's ``<cls>`` state,
  and on the mean of the Q-Former's query outputs. Their gap to ``lr_tokens`` is what the trained
  encoder does not represent;
- ``centroid_features``: nearest training-cell centroid of each type in the contrastive feature
  space (cosine, max over queries as in CTC). Its gap to the representation probes is what the
  contrastive head loses;
- ``zero_shot``: the text of each type as its prototype (``ScMMGPT.score_labels``). Its gap to
  ``centroid_features`` is the text side: type texts that do not sit where their cells are;
- ``zero_shot_train``: the same zero-shot read-out on the training cells themselves. A gap to
  ``zero_shot`` is over-fitting; none is a model that has not yet learnt its training cells.

Run: ``python benchmarks/probe.py NAME --variant base: --seeds 1 2 3``; writes
``benchmarks/results/recipe/NAME.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from recipe import new_record, parse_variants  # noqa: E402  (the same record and --variant syntax)

PROBES = ("lr_expression", "lr_tokens", "lr_cls", "lr_query", "centroid_features", "zero_shot", "zero_shot_train")


def _logistic(x_train, y_train, x_test, y_test, seed: int) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x_train)
    clf = LogisticRegression(max_iter=2000, random_state=seed).fit(scaler.transform(x_train), y_train)
    return float((clf.predict(scaler.transform(x_test)) == y_test).mean())


def _token_matrix(ds, n_genes: int) -> np.ndarray:
    """(N, V) the values of each cell's tokens at their genes (the ``<cls>`` token dropped)."""
    x = np.zeros((len(ds), n_genes), np.float32)
    for i in range(len(ds)):
        item = ds[i]
        x[i, np.asarray(item["gene_ids"][1:])] = np.asarray(item["values"][1:])
    return x


def probe_one(overrides: list[str], seed: int, data: str | None, steps: int | None) -> dict:
    import torch

    from scmmgpt.baselines.reference import logistic_regression_reference, logistic_scores
    from scmmgpt.data.labelled import DataConfig, load_labelled
    from scmmgpt.models.scmmgpt import ScMMGPT
    from scmmgpt.train.loop import fit
    from scmmgpt.train.run import load_run_config
    from scmmgpt.utils.seed import seeded

    extra = [f"train.max_steps={steps}"] if steps else []
    rc = load_run_config("cpu-small", [f"train.seed={seed}", *overrides, *extra])
    lab = load_labelled(DataConfig(path=data, split=(0.7, 0.1, 0.2), seed=seed), target_sum=rc.model.target_sum)
    with seeded(seed):
        model = ScMMGPT.build(rc.model, lab.vocab, with_lm=False)
    cfg = rc.train
    cfg.stage, cfg.progress = "stage1", False
    train = lab.dataset("train", **model.reading)
    test = lab.dataset("test", **model.reading)
    t0 = time.perf_counter()
    fit(model, train, cfg, measured=lab.cells.measured, label_terms=lab.label_set())
    seconds = time.perf_counter() - t0

    names = sorted(set(lab.types("train")))
    y_tr = np.array([names.index(t) for t in lab.types("train")])
    y_te = np.array([names.index(t) if t in names else -1 for t in lab.types("test")])
    out: dict = {"seed": seed, "seconds": round(seconds, 1)}
    out["lr_expression"] = logistic_regression_reference(lab, seed=seed)["acc1"]
    n_genes = len(lab.vocab)
    # the reference's own estimator (no scaling), so lr_tokens and lr_expression differ only in input
    tok = logistic_scores(_token_matrix(train, n_genes), lab.types("train"), _token_matrix(test, n_genes), names,
                          seed=seed)
    out["lr_tokens"] = float((tok.argmax(1) == y_te).mean())
    f_tr, f_te = model.encode(train), model.encode(test)
    out["lr_cls"] = _logistic(f_tr.cell_embedding.float().numpy(), y_tr, f_te.cell_embedding.float().numpy(), y_te, seed)
    out["lr_query"] = _logistic(f_tr.query_mean.float().numpy(), y_tr, f_te.query_mean.float().numpy(), y_te, seed)
    feats_tr, feats_te = f_tr.features.float(), f_te.features.float()
    cent = torch.nn.functional.normalize(torch.stack([feats_tr[torch.from_numpy(y_tr == k)].mean(0).mean(0)
                                                      for k in range(len(names))]), dim=-1)
    sims = torch.einsum("nqd,td->nqt", feats_te, cent).amax(1)
    out["centroid_features"] = float((sims.argmax(1).numpy() == y_te).mean())
    ls = model.score_labels(test, lab.label_set())
    truth = np.array([ls.names.index(t) for t in lab.types("test")])
    out["zero_shot"] = float((ls.scores.argmax(1) == truth).mean())
    # the same on the training cells: a gap to zero_shot is over-fitting, not capacity
    ls_tr = model.score_labels(train, lab.label_set())
    out["zero_shot_train"] = float((ls_tr.scores.argmax(1) == np.array([ls_tr.names.index(t) for t in lab.types("train")])).mean())
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("name")
    ap.add_argument("--variant", action="append", required=True, help="NAME:k=v,k=v (empty overrides allowed)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--steps", type=int, default=None, help="stage-1 steps (default: the config's)")
    ap.add_argument("--data", default=None, help="an .h5ad (default: the bundled pbmc68k_reduced)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "recipe"))
    a = ap.parse_args()
    record = new_record(a.name, "probe.py", a.data, a.seeds)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, overrides in parse_variants(a.variant).items():
        runs = []
        for s in a.seeds:
            runs.append(probe_one(overrides, s, a.data, a.steps))
            print(name, runs[-1], flush=True)
        summary = {p: [float(np.mean([r[p] for r in runs])), float(np.std([r[p] for r in runs], ddof=1)) if len(runs) > 1 else 0.0]
                   for p in PROBES}
        record["variants"][name] = {"overrides": overrides, "runs": runs, "summary": summary}
        print(f"{name:20s} " + "  ".join(f"{p} {m:.3f}±{sd:.3f}" for p, (m, sd) in summary.items()), flush=True)
        (out / f"{a.name}.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
