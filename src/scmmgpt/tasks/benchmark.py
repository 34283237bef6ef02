"""Benchmark protocols in the paper's table layouts, with baselines beside scMMGPT.

``annotation`` (paper Table 3, on the data at hand):

1. *pre-train* stage 1 (CTC + CTM) on ``pretrain_data``: another dataset, several (joined into one
   corpus by :func:`~scmmgpt.data.corpus.build_corpus`), or a corpus / shard folder, with batches
   balanced across its datasets and types. A dataset of the corpus that *is* the evaluation data is
   left out of pre-training (leave one dataset out), so a zero-shot figure never comes from cells,
   or a dataset, that pre-training saw. Its vocabulary covers the evaluation data's genes;
2. *zero-shot* on another dataset (``data``): every test cell scored against the descriptions of
   all of the dataset's cell types (none seen in training under this dataset's name; types shared
   with the pre-training data are "seen" as biology, not as these cells);
3. *fine-tuned on a fraction of the types*: for each fraction ``f``, fine-tune (CTC + CTM) on the
   training cells of a seeded ``ceil(f * n_types)`` types of ``data`` and score the test cells of
   all types, reported separately for seen and unseen types. Beside it, on the same cells: the
   WiSE-FT interpolation of the fine-tuned weights with the pre-trained ones
   (``scmmgpt_wise``, ``wise_alpha``; :mod:`scmmgpt.train.wise`), and the pre-trained model
   itself (``scmmgpt_zero_shot``), so that fine-tuning's effect on the types it did not see is
   read against the zero-shot figure of the same cells; and ``scmmgpt_gated``: the fine-tuned model
   with its novelty gate, which sends cells unlike the fine-tuning cells to the pre-trained model
   (``tl.annotate(..., zero_shot_model=...)``; :mod:`scmmgpt.models.gate`);
4. beside the zero-shot figure, the cross-dataset reference ``logreg_corpus``: a logistic
   regression trained on the pre-training cells (:func:`_corpus_logistic`);
5. baselines on the same split: random scores, and logistic regression / k-NN (k=15) on
   log-normalised expression trained on the same training cells (supervised references: they
   cannot score a type without training cells, so their unseen-type accuracy is 0 by construction).

Acc@k is over all of ``data``'s types (capped at their number), ties counted against the truth.
Output: ``results.json`` (every figure, the command, data files, seed and machine) and
``results.md`` (the table).
"""

from __future__ import annotations

import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..eval.annotation import annotation_metrics
from ..utils.io import atomic_write_text

__all__ = ["AnnotationBenchmark", "run_annotation_benchmark", "machine_info", "provenance_lines", "FAST_OVERRIDES",
           "train_stage1"]

#: Model and batch size of every protocol's ``fast()`` (CI) setting.
FAST_OVERRIDES = ("model.max_genes=64", "train.batch_size=8")


@dataclass
class AnnotationBenchmark:
    """Settings of the annotation protocol. ``fast()`` is the CI setting."""

    data: str
    """Evaluation ``.h5ad`` (counts in ``X``)."""
    pretrain_data: str | tuple[str, ...]
    """What the stage-1 model is pre-trained on: an ``.h5ad`` (another dataset), several (joined
    into a corpus), or a corpus / shard folder (``scmmgpt corpus`` / ``scmmgpt shard``)."""
    label_key: str = "cell_type"
    fractions: tuple[float, ...] = (0.1, 0.2, 0.3, 1.0)
    """Fractions of the evaluation types fine-tuned on (paper: 10/20/30%; 100% is the later version's
    fine-tuned annotation, every type seen)."""
    ks: tuple[int, ...] = (1, 5, 10)
    pretrain_steps: int = 300
    finetune_steps: int = 100
    wise_alpha: float = 0.5
    """Weight of the fine-tuned weights in the ``scmmgpt_wise`` row (WiSE-FT). 0.5, the WiSE-FT
    paper's fixed choice where no held-out data of the unseen classes exists to tune it; fixed here
    before any measurement, never tuned on test cells."""
    split: tuple[float, float, float] = (0.7, 0.1, 0.2)
    seed: int = 0
    config: str = "cpu-small"
    """Packaged (or YAML) run configuration for model size and optimiser."""
    overrides: list[str] = field(default_factory=list)
    pretrained: str | None = None
    """A stage-1 model this protocol pre-trained before (``{out}/pretrained`` of an earlier run with
    the same settings and seed): step 1 loads it instead of training again."""

    @classmethod
    def fast(cls, data: str, pretrain_data: str | tuple[str, ...], **kw) -> "AnnotationBenchmark":
        kw["overrides"] = [*FAST_OVERRIDES, *kw.get("overrides", [])]
        return cls(data, pretrain_data, **{"fractions": (0.3,), "pretrain_steps": 8, "finetune_steps": 2, **kw})


def machine_info() -> dict:
    import torch

    info = {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
            "cpu_count": __import__("os").cpu_count(), "cuda": torch.cuda.get_device_name(0)
            if torch.cuda.is_available() else None}
    try:
        import subprocess

        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                            cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
    except Exception:  # pragma: no cover - not a checkout
        info["git_commit"] = None
    return info


def provenance_lines(record: dict, detail: str = "") -> list[str]:
    """The footer of every results table: the command, then machine, commit and total seconds
    (``detail`` goes in brackets after them)."""
    m = record["machine"]
    return [f"Command: `{record['command']}`" if record.get("command") else "",
            f"Machine: {m['platform']}, {m['cpu_count']} CPUs, CUDA: {m['cuda']}; commit {m.get('git_commit')}; "
            f"{record['seconds']['total']:.0f} s{f' ({detail})' if detail else ''}."]


def train_stage1(config: str, overrides, seed: int, steps: int, data, *, progress: bool = False):
    """``(model, cells, train config)``: a new model in the vocabulary of ``data`` (a
    :class:`~scmmgpt.data.labelled.DataConfig`) trained ``steps`` stage-1 steps on its training cells,
    deterministically, with a warm-up of at most a sixth of the steps; the protocols that train on the
    data at hand (clustering, mapping / OOD) start so."""
    from ..data.labelled import load_labelled
    from ..models.scmmgpt import ScMMGPT
    from ..train.loop import fit
    from ..train.run import load_run_config
    from ..utils.seed import seeded

    rc = load_run_config(config, [f"train.seed={seed}", *overrides])
    cfg = rc.train
    cfg.stage, cfg.max_steps, cfg.progress, cfg.val_every, cfg.out_dir = "stage1", steps, progress, None, None
    cfg.warmup_steps, cfg.deterministic = min(cfg.warmup_steps, max(1, steps // 6)), True
    lab = load_labelled(data, target_sum=rc.model.target_sum)
    with seeded(seed):
        model = ScMMGPT.build(rc.model, lab.vocab, with_lm=False)
    fit(model, lab.dataset("train", **model.reading), cfg, train_types=lab.types("train"))
    return model, lab, cfg


def _scores(model, lab, labels: list[str], zero_shot=None) -> np.ndarray:
    """(n_test, n_labels) zero-shot scores of the test cells: ``score_labels`` over ``labels``,
    each named as in the data with its CL term (what ``tl.annotate(labels={name: id})`` reads);
    ``zero_shot``: through the model's novelty gate, as ``tl.annotate(zero_shot_model=...)``."""
    ds = lab.dataset("test", **model.reading)
    label_set = lab.label_set()
    return model.score_labels(ds, {name: label_set.get(name, name) for name in labels}, zero_shot=zero_shot).scores


def _split_metrics(scores, labels, truth, ids, truth_ids, ks, seen: set[str] | None) -> dict:
    """Metrics over all test cells, and over seen / unseen types when ``seen`` is given."""
    out = {"all": annotation_metrics(scores, labels, truth, ks=ks, label_ids=ids, truth_ids=truth_ids)}
    if seen is not None:
        for name, mask in (("seen", np.isin(truth, list(seen))), ("unseen", ~np.isin(truth, list(seen)))):
            if mask.any():
                out[name] = annotation_metrics(scores[mask], labels, truth[mask], ks=ks, label_ids=ids,
                                               truth_ids=truth_ids[mask])
                del out[name]["confusion"]          # the "all" matrix holds these rows
    return out


def _baselines(lab, labels, truth, ids, truth_ids, ks, seed, train_idx, seen) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier

    from ..baselines.reference import classifier_scores

    x = lab.cells.expr[:, lab.cells.measured]
    y = lab.descriptions["cell_type"].astype(str).to_numpy()
    xtr, ytr, xte = x[train_idx], y[train_idx], x[lab.split["test"]]
    out = {"random": _split_metrics(np.random.default_rng(seed).random((xte.shape[0], len(labels))), labels, truth,
                                     ids, truth_ids, ks, seen)}
    for name, clf in (("logreg", LogisticRegression(max_iter=2000, random_state=seed)),
                      ("knn", KNeighborsClassifier(n_neighbors=min(15, len(ytr))))):
        scores = classifier_scores(clf, xtr, ytr, xte, labels)
        out[name] = _split_metrics(scores, labels, truth, ids, truth_ids, ks, seen)
    return out


def _corpus_logistic(pre, lab, model, labels: list[str], ids: list[str], seed: int) -> np.ndarray:
    """The cross-dataset reference: a logistic regression fitted on the pre-training cells (their
    corpus labels) and scored on the evaluation test cells over ``labels``.

    It reads the log-normalised expression (eq. 1) of the genes that the evaluation data measured
    and, where the model has one, that lie in its input panel. A label that is not a corpus class
    is scored through its corpus ancestors, by the same Cell Ontology back-off as the model
    (:func:`~scmmgpt.data.label_texts.back_off_scores`). Otherwise it scores -1."""
    from ..baselines.reference import logistic_scores
    from ..data.label_texts import back_off_scores, backoff_labels, candidate_labels

    genes = lab.cells.measured.copy()
    if model.input_gene_mask is not None:
        genes &= model.input_gene_mask
    cols = np.flatnonzero(genes)
    y = pre.types("train").astype(str)
    classes = sorted(set(y))
    p = logistic_scores(pre.cells.rows_csr(pre.split["train"])[:, cols], y,
                        lab.cells.rows_csr(lab.split["test"])[:, cols], classes, seed=seed)
    own = np.full((p.shape[0], len(labels)), -1.0)
    for j, name in enumerate(labels):
        if name in classes:
            own[:, j] = p[:, classes.index(name)]
    class_of = {term: name for name, term in pre.label_set().items()}
    proxies, links = backoff_labels(candidate_labels(labels=dict(zip(labels, ids))), sorted(class_of))
    if proxies is None:
        return own
    proxy = p[:, [classes.index(class_of[term]) for term in proxies.ids]]
    return back_off_scores(own, proxy, links)


def pretraining_cells(b: AnnotationBenchmark, out: Path, target_sum: float):
    """``(cells, left_out)``: the labelled pre-training cells of ``b.pretrain_data`` and the names of
    the datasets left out of them because they are the evaluation data (``b.data``: the same file,
    or a corpus dataset made from it or named like it). Several files are first joined into a corpus
    under ``out/pretrain-corpus``."""
    from ..data.corpus import build_corpus
    from ..data.labelled import DataConfig, load_labelled
    from ..data.source import measured_genes
    from ..errors import InputDataError

    sources = [b.pretrain_data] if isinstance(b.pretrain_data, str) else list(b.pretrain_data)
    if len(sources) > 1:
        build_corpus(sources, out / "pretrain-corpus")
        path = str(out / "pretrain-corpus")
    else:
        path = str(sources[0])
    pre = load_labelled(DataConfig(path=path, label_key=b.label_key, split=b.split, seed=b.seed),
                        target_sum=target_sum)
    target = Path(b.data).resolve()
    if Path(path).is_file():
        if Path(path).resolve() == target:
            raise InputDataError(f"--pretrain-data is the evaluation data ({b.data}); pre-train on another "
                                 "dataset or on a corpus (the evaluation dataset is then left out of it).")
        return pre, []
    leave = {target.stem}
    info_file = Path(path) / "corpus.json"
    if info_file.is_file():
        for rec in json.loads(info_file.read_text())["datasets"]:
            src = rec.get("source", "")
            if src and src != "pbmc68k_reduced" and Path(src).resolve() == target:
                leave.add(rec["name"])
    mg = measured_genes(pre.cells)
    names = np.asarray(mg.names, dtype=object)[mg.group]
    keep = ~np.isin(names.astype(str), sorted(leave))
    left_out = sorted({str(n) for n in names[~keep]})
    pre.split = {k: v[keep[v]] for k, v in pre.split.items()}
    if len(pre.split["train"]) == 0:
        raise InputDataError(f"Leaving {b.data} out of {path} leaves no pre-training cells.")
    return pre, left_out


def run_annotation_benchmark(b: AnnotationBenchmark, out: str | Path, *, progress: bool = False,
                             command: str | None = None) -> dict:
    """Run the annotation protocol; write ``{out}/results.json`` and ``{out}/results.md``."""
    from ..data.labelled import DataConfig, load_labelled
    from ..models.gate import calibrate_gate
    from ..models.scmmgpt import ScMMGPT
    from ..train.loop import fit
    from ..train.run import load_run_config
    from ..train.wise import interpolate, trained_snapshot
    from ..utils.seed import seeded

    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rc = load_run_config(b.config, [f"train.seed={b.seed}", *b.overrides])
    cfg = rc.train
    cfg.progress, cfg.val_every, cfg.out_dir, cfg.deterministic = progress, None, None, True

    # 1. pre-train stage 1 on the other dataset(s), the evaluation dataset left out
    pre, left_out = pretraining_cells(b, out, rc.model.target_sum)
    cfg.stage, cfg.max_steps = "stage1", b.pretrain_steps
    cfg.warmup_steps = min(cfg.warmup_steps, max(1, b.pretrain_steps // 10))
    if b.pretrained is not None:
        model = ScMMGPT.from_pretrained(b.pretrained, with_lm=False)
    else:
        with seeded(b.seed):
            model = ScMMGPT.build(rc.model, pre.vocab, with_lm=False)
        fit(model, pre.dataset("train", **model.reading), cfg,
            measured="by_source", train_types=pre.types("train"))
    if b.pretrained is None or Path(b.pretrained).resolve() != (out / "pretrained").resolve():
        model.save_pretrained(out / "pretrained")
    t_pre = time.perf_counter() - t0

    # 2. zero-shot on the evaluation data, in the pre-trained vocabulary
    lab = load_labelled(DataConfig(path=b.data, label_key=b.label_key, split=b.split, seed=b.seed),
                        vocab=model.vocab, target_sum=model.config.target_sum)
    desc = lab.descriptions
    usable = ~desc["ambiguous"].to_numpy()
    labels = sorted({str(t) for t in desc["cell_type"][usable]})
    id_of = {str(t): str(i) for t, i in zip(desc["cell_type"], desc["cell_type_id"])}
    ids = [id_of[t] for t in labels]
    test = lab.split["test"]
    truth = desc["cell_type"].astype(str).to_numpy()[test]
    truth_ids = np.array([id_of[t] for t in truth])
    pre_types = sorted({str(t) for t in pre.types("train")})
    zero_shot = _scores(model, lab, labels)
    results: dict = {"zero_shot": {"scmmgpt": _split_metrics(zero_shot, labels, truth, ids,
                                                             truth_ids, b.ks, set(pre_types) & set(labels)),
                                   "logreg_corpus": _split_metrics(_corpus_logistic(pre, lab, model, labels, ids, b.seed),
                                                                   labels, truth, ids, truth_ids, b.ks,
                                                                   set(pre_types) & set(labels)),
                                   **_baselines(lab, labels, truth, ids, truth_ids, b.ks, b.seed, lab.split["train"],
                                                None)},
                     "fine_tuned": {}}
    # 3. fine-tune on a fraction of the types, from the pre-trained model each time
    for f in b.fractions:
        sub = load_labelled(DataConfig(path=b.data, label_key=b.label_key, split=b.split, seed=b.seed,
                                       types_fraction=f), vocab=model.vocab, target_sum=model.config.target_sum)
        assert np.array_equal(sub.split["test"], test)          # same cells, only training types differ
        ft = ScMMGPT.from_pretrained(out / "pretrained", with_lm=False)
        fcfg = type(cfg).from_dict({**cfg.to_dict(), "stage": "annotate", "max_steps": b.finetune_steps,
                                    "warmup_steps": max(1, b.finetune_steps // 10)})
        start = trained_snapshot(ft.net, "annotate")
        train_ds = sub.dataset("train", **ft.reading)
        # the gate of scmmgpt finetune --task annotate, calibrated on the validation cells
        gate = calibrate_gate(ft, train_ds, sub.types("train"), val=sub.dataset("val", **ft.reading),
                              terms=sub.label_set())
        fit(ft, train_ds, fcfg)
        ft.set_gate(gate)
        seen = set(sub.train_types)
        tuned = _scores(ft, sub, labels)
        gated = _scores(ft, sub, labels, zero_shot=model)
        interpolate(ft.net, start, b.wise_alpha)
        results["fine_tuned"][f"{f:g}"] = {
            "train_types": sub.train_types,
            "scmmgpt": _split_metrics(tuned, labels, truth, ids, truth_ids, b.ks, seen),
            "scmmgpt_gated": _split_metrics(gated, labels, truth, ids, truth_ids, b.ks, seen),
            "scmmgpt_wise": _split_metrics(_scores(ft, sub, labels), labels, truth, ids, truth_ids, b.ks, seen),
            "scmmgpt_zero_shot": _split_metrics(zero_shot, labels, truth, ids, truth_ids, b.ks, seen),
            **_baselines(sub, labels, truth, ids, truth_ids, b.ks, b.seed, sub.split["train"], seen)}

    record = {"protocol": "annotation", "settings": {**asdict(b), "fractions": list(b.fractions), "ks": list(b.ks)},
              "command": command, "data": str(b.data), "pretrain_data": b.pretrain_data if isinstance(b.pretrain_data, str) else list(b.pretrain_data),
              "pretrain_left_out": left_out,
              "n_test_cells": int(len(test)), "n_types": len(labels), "labels": labels,
              "pretrain_types": pre_types, "machine": machine_info(),
              "seconds": {"pretrain": round(t_pre, 1), "total": round(time.perf_counter() - t0, 1)},
              "results": results}
    atomic_write_text(out / "results.json", json.dumps(record, indent=2))
    atomic_write_text(out / "results.md", annotation_table(record))
    return record


def _fmt(m: dict | None, key: str) -> str:
    if m is None or key not in m or m[key] is None or (isinstance(m[key], float) and math.isnan(m[key])):
        return "–"
    return f"{100 * m[key]:.1f}"


def annotation_table(record: dict) -> str:
    """Markdown in the layout of the paper's Table 3: rows = methods, columns = Acc@k for zero-shot
    and each fine-tuning fraction (seen / unseen types)."""
    ks = record["settings"]["ks"]
    res = record["results"]
    methods = ["scmmgpt", "scmmgpt_gated", "scmmgpt_wise", "scmmgpt_zero_shot", "logreg_corpus", "logreg", "knn",
               "random"]
    head = ["method", *[f"zero-shot Acc@{k}" for k in ks]]
    for f in res["fine_tuned"]:
        head += [f"ft {float(f):.0%} {part} Acc@{k}" for part in ("seen", "unseen") for k in ks]
    pre = record["pretrain_data"]
    pre_name = ", ".join(f"`{Path(x).name}`" for x in ([pre] if isinstance(pre, str) else pre))
    left = record.get("pretrain_left_out") or []
    lines = [f"Annotation on `{Path(record['data']).name}` ({record['n_test_cells']} test cells, "
             f"{record['n_types']} types); stage 1 pre-trained on {pre_name}"
             + (f" with {', '.join(left)} left out" if left else "") + ". "
             "Acc@k in %. logreg_corpus is the cross-dataset reference: a logistic regression trained on the "
             "pre-training cells, scored over this data's labels with the model's ontology back-off. logreg/knn "
             "are supervised references trained on this data's own training cells. Fine-tuned columns: "
             f"scmmgpt_wise interpolates the fine-tuned weights with the pre-trained ones (WiSE-FT, alpha "
             f"{record['settings'].get('wise_alpha', '–')}); scmmgpt_gated sends cells unlike the fine-tuning cells "
             "to the pre-trained model (novelty gate); scmmgpt_zero_shot is the pre-trained model on the same "
             "cells.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        if m not in res["zero_shot"] and not any(m in r for r in res["fine_tuned"].values()):
            continue                           # a record from before the row existed
        row = [m, *[_fmt(res["zero_shot"].get(m, {}).get("all"), f"acc@{k}") for k in ks]]
        for f, r in res["fine_tuned"].items():
            row += [_fmt(r[m].get(part) if m in r else None, f"acc@{k}") for part in ("seen", "unseen") for k in ks]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", *provenance_lines(record)]
    return "\n".join(lines) + "\n"
