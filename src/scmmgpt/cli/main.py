"""``scmmgpt`` command line: each subcommand calls one Python function.

User errors (:class:`~scmmgpt.errors.ScMMGPTError`) are printed as one message, exit status 2,
without a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Callable

from ..errors import ConfigError, InputDataError, ScMMGPTError

COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str):
    """Register ``(add_arguments, run)`` for a subcommand."""

    def wrap(fn):
        add, run = fn()
        run.__doc__ = fn.__doc__
        COMMANDS[name] = (add, run)
        return fn

    return wrap


@command("check")
def _check():
    """Check an .h5ad: value kind, gene mapping, description examples (the data pipeline end to end)."""

    def add(p: argparse.ArgumentParser) -> None:
        p.add_argument("data", help="path to an .h5ad file")
        p.add_argument("--layer", default=None, help="matrix to read (default: X)")
        p.add_argument("--use-raw", action="store_true", help="read adata.raw.X")
        p.add_argument("--label-key", default="cell_type", help="obs column with cell type labels")
        p.add_argument("--backed", action="store_true", help="read X from disk in chunks (large files)")
        p.add_argument("--max-genes", type=int, default=2048, help="top genes kept per cell")

    def run(args: argparse.Namespace) -> int:
        from ..data.pipeline import check_dataset

        report = check_dataset(args.data, layer=args.layer, use_raw=args.use_raw, label_key=args.label_key,
                               backed=args.backed, max_genes=args.max_genes)
        print(json.dumps(report, indent=2))
        return 0

    return add, run


@command("shard")
def _shard():
    """Preprocess .h5ad files (read in backed mode, block by block) into on-disk shards that training
    streams from with constant memory: pass the shard folder as --data to pretrain / finetune."""

    def add(p: argparse.ArgumentParser) -> None:
        p.add_argument("data", nargs="+", help=".h5ad files")
        p.add_argument("--out", required=True, help="shard folder")
        p.add_argument("--model", default=None, help="use this model's gene vocabulary and target_sum")
        p.add_argument("--label-key", default="cell_type", help="obs column with cell type labels")
        p.add_argument("--text-key", default=None, help="obs column of free-text descriptions")
        p.add_argument("--layer", default=None, help="matrix to read (default: X)")
        p.add_argument("--use-raw", action="store_true", help="read adata.raw.X")
        p.add_argument("--cells-per-shard", type=int, default=50_000)
        _add_min_coverage(p)
        p.add_argument("--workers", type=int, default=1, help="processes on this machine")
        p.add_argument("--rank", type=int, default=None, help="this node's rank (default: $RANK)")
        p.add_argument("--world-size", type=int, default=None, help="number of nodes (default: $WORLD_SIZE)")

    def run(args: argparse.Namespace) -> int:
        from ..data.shards import write_shards

        vocab, target_sum = None, 1e4
        if args.model:
            from ..models.scmmgpt import ScMMGPT

            model = ScMMGPT.from_pretrained(args.model, with_lm=False)
            vocab, target_sum = model.vocab, model.config.target_sum
        m = write_shards(args.data, args.out, vocab=vocab, label_key=args.label_key, text_key=args.text_key,
                         layer=args.layer, use_raw=args.use_raw, target_sum=target_sum,
                         cells_per_shard=args.cells_per_shard, workers=args.workers, rank=args.rank,
                         world_size=args.world_size, min_coverage=args.min_coverage, progress=True)
        done = [s for s in m["shards"] if s]
        print(json.dumps({"out": args.out, "shards": len(done), "of": len(m["shards"]), "cells": m["n_cells"],
                          "complete": len(done) == len(m["shards"])}, indent=2))
        return 0

    return add, run


@command("corpus")
def _corpus():
    """Build a pre-training corpus from labelled datasets: labels harmonised to the Cell Ontology
    (ambiguous and unmatched cells left out, counted), one gene vocabulary, each dataset's measured
    genes recorded, written as shards; pass the folder as --data to pretrain."""

    def add(p: argparse.ArgumentParser) -> None:
        p.add_argument("data", nargs="+", help=".h5ad files (obs: cell_type, cell_type_ontology_term_id), or "
                                               "pbmc68k_reduced for the bundled PBMCs")
        p.add_argument("--out", required=True, help="corpus folder")
        p.add_argument("--label-key", default="cell_type", help="obs column with cell type labels")
        p.add_argument("--organism", default="homo_sapiens", choices=("homo_sapiens", "mus_musculus"))
        p.add_argument("--cells-per-shard", type=int, default=50_000)
        p.add_argument("--workers", type=int, default=1, help="processes on this machine")

    def run(args: argparse.Namespace) -> int:
        from ..data.corpus import CorpusEntry, build_corpus

        info = build_corpus([CorpusEntry(d, label_key=args.label_key) for d in args.data], args.out,
                            organism=args.organism, cells_per_shard=args.cells_per_shard, workers=args.workers,
                            progress=True)
        print(json.dumps({"out": args.out, "cells": info["n_cells"], "genes": info["n_genes"],
                          "datasets": {r["name"]: r.get("n_kept", r.get("skipped")) for r in info["datasets"]}},
                         indent=2))
        return 0

    return add, run


@command("demo")
def _demo():
    """Train scMMGPT on the bundled PBMCs (or --data) on a CPU and report on held-out cells:
    zero-shot annotation, cell descriptions, pseudo-cells; writes report.html, metrics.json and the
    model."""

    def add(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data", default=None, help=".h5ad file (default: bundled pbmc68k_reduced)")
        p.add_argument("--label-key", default="cell_type", help="obs column with cell type labels")
        p.add_argument("--layer", default=None, help="matrix to read (default: X)")
        p.add_argument("--use-raw", action="store_true", help="read adata.raw.X")
        p.add_argument("--out", default="demo_report", help="output folder")
        p.add_argument("--fast", action="store_true", help="tiny schedules (about a minute; for CI)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--set-default", action="store_true",
                       help="make the trained model the default --model of embed/annotate/describe/generate/search")

    def run(args: argparse.Namespace) -> int:
        from ..tasks.demo import run_demo

        m = run_demo(data=args.data, label_key=args.label_key, layer=args.layer, use_raw=args.use_raw,
                     out=args.out, fast=args.fast, seed=args.seed, set_default=args.set_default)
        a, d, g = m["annotation"], m["description"], m["generation"]
        print(f"scMMGPT demo on {m['data']}: {m['split']['test']} held-out test cells, {a['n_labels']} cell types "
              f"(chance Acc@1 {m['chance_acc1']:.3f})")
        lr = m["reference"]["logistic_regression"]
        print(f"  zero-shot annotation  Acc@1 {a['acc1']:.3f}  Acc@3 {a['acc3']:.3f}  macro-F1 {a['macro_f1']:.3f}")
        print(f"    reference: logistic regression on the same training cells (supervised)  "
              f"Acc@1 {lr['acc1']:.3f}  macro-F1 {lr['macro_f1']:.3f}")
        ld, tm = m["reference"]["logistic_regression_description"], m["reference"]["type_mean_generation"]
        print(f"  cell -> text          BLEU-2 {d['bleu2']:.3f}  ROUGE-2 {d['rouge2']:.3f}  "
              f"right type named {d['type_named']:.3f}")
        print(f"    reference: logistic regression -> its type's description  BLEU-2 {ld['bleu2']:.3f}  "
              f"ROUGE-2 {ld['rouge2']:.3f}  right type named {ld['type_named']:.3f}")
        print(f"  text -> cell          k-NN accuracy {g['knn_accuracy']:.3f} ({g['n_generated']} pseudo-cells)")
        print(f"    reference: each type's mean training profile  k-NN accuracy {tm['knn_accuracy']:.3f}")
        print(f"  {m['seconds']['total']:.0f} s; report: {m['report']}  model: {m['model']}")
        if args.set_default:
            print("  this model is now the default of scmmgpt embed/annotate/describe/generate/search")
        return 0

    return add, run


def _add_training_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=None, help=".h5ad file (default: bundled pbmc68k_reduced)")
    p.add_argument("--label-key", default=None, help="obs column with cell type labels (default: cell_type)")
    p.add_argument("--text-key", default=None, help="obs column of free-text descriptions (replaces the template)")
    p.add_argument("--layer", default=None, help="matrix to read (default: X)")
    p.add_argument("--use-raw", action="store_true", help="read adata.raw.X")
    p.add_argument("--config", default=None,
                   help="YAML run config, or a packaged one: stage1, stage2, finetune, cpu-small")
    p.add_argument("--out", required=True, help="output folder: checkpoints, metrics.jsonl, model/")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=1e-4 (repeatable)")


def _run_training(args: argparse.Namespace, stage: str, init: str | None) -> int:
    from ..train.run import load_run_config, run_training

    over = list(args.overrides)
    for key, value in (("data.path", args.data), ("data.label_key", args.label_key),
                       ("data.text_key", args.text_key), ("data.layer", args.layer)):
        if value is not None:
            over.append(f"{key}={json.dumps(value)}")
    if args.use_raw:
        over.append("data.use_raw=true")
    over += [f"train.stage={stage}", f"train.out_dir={json.dumps(args.out)}"]
    if init is not None:
        over.append(f"init={json.dumps(init)}")
    rc = load_run_config(args.config, over)
    print(json.dumps(run_training(rc, resume=args.resume), indent=2))
    return 0


@command("pretrain")
def _pretrain():
    """Pre-train: --stage 1 (cell encoder + Q-Former, CTC + CTM, from scratch or --model) or
    --stage 2 (from the stage-1 --model: text-to-cell + LoRA LM, CDGen + PCGen)."""

    def add(p: argparse.ArgumentParser) -> None:
        p.add_argument("--stage", type=int, choices=(1, 2), required=True)
        p.add_argument("--model", default=None, help="model to start from: a folder, pbmc-small or owner/name@COMMIT (required for stage 2)")
        p.add_argument("--cell-checkpoint", default=None,
                       help="stage 1: a scGPT checkpoint directory (args.json, vocab.json, best_model.pt) to start "
                            "the cell encoder from; its gene vocabulary, sizes, pad value and binning are used")
        _add_training_args(p)

    def run(args: argparse.Namespace) -> int:
        if args.cell_checkpoint is not None:
            if args.model is not None:
                raise ConfigError("--cell-checkpoint starts a new model; it cannot be combined with --model.")
            args.overrides.append(f"model.cell_checkpoint={json.dumps(args.cell_checkpoint)}")
        return _run_training(args, f"stage{args.stage}", args.model)

    return add, run


@command("finetune")
def _finetune():
    """Fine-tune a saved model for one task: annotate (CTC + CTM), describe (CDGen), generate (PCGen).
    --set data.types_fraction=0.5 trains on half the cell types (paper Table 3). annotate also records
    a novelty gate: `scmmgpt annotate --model FT --zero-shot-model START` sends cells unlike the
    fine-tuning cells back to the starting model."""

    def add(p: argparse.ArgumentParser) -> None:
        p.add_argument("--task", choices=("annotate", "describe", "generate"), required=True)
        p.add_argument("--model", required=True,
                       help="model to start from: a folder, pbmc-small or owner/name@COMMIT")
        _add_training_args(p)

    def run(args: argparse.Namespace) -> int:
        return _run_training(args, args.task, args.model)

    return add, run


# ---------------------------------------------------------------------------------- inference
def _add_min_coverage(p: argparse.ArgumentParser) -> None:
    p.add_argument("--min-coverage", type=float, default=0.5,
                   help="refuse data whose genes in the vocabulary hold less than this fraction of the "
                        "expression (default 0.5)")


def _add_model_args(p: argparse.ArgumentParser, *, data: bool = True) -> None:
    p.add_argument("--model", default=None,
                   help="model folder, the shipped pre-trained `pbmc-small`, or a Hugging Face Hub repository "
                        "owner/name@COMMIT (default: $SCMMGPT_MODEL, else the model of the last "
                        "`scmmgpt demo --set-default`)")
    p.add_argument("--device", default=None, help="torch device, e.g. cpu, cuda, cuda:1 (default: cpu)")
    p.add_argument("--batch-size", type=int, default=None, help="cells per batch")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="auto: bf16 where the CPU/GPU has native bf16 matmul, else fp32")
    if data:
        p.add_argument("data", help="input .h5ad (embed: or a shard folder from `scmmgpt shard`)")
        p.add_argument("-o", "--output", default=None,
                       help="output .h5ad (default: INPUT_scmmgpt.h5ad next to the input)")
        p.add_argument("--inplace", action="store_true", help="write the results into the input file")
        p.add_argument("--layer", default=None, help="matrix to read (default: X)")
        p.add_argument("--use-raw", action="store_true", help="read adata.raw.X")
        p.add_argument("--gene-symbol-key", default=None, help="var column with gene symbols")
        _add_min_coverage(p)


def _load_model(args, *, with_lm: bool):
    from ..assets import default_model
    from ..models.scmmgpt import ScMMGPT

    path = args.model or default_model()
    return ScMMGPT.from_pretrained(path, with_lm=None if with_lm else False, device=args.device or "cpu")


def _read(args):
    from ..data.io import read_h5ad

    return read_h5ad(args.data)


def _output_path(args) -> Path:
    src = Path(args.data).resolve()
    if args.inplace:
        if args.output and Path(args.output).resolve() != src:
            raise ConfigError("--inplace writes into the input file; drop --output or --inplace.")
        return src
    out = Path(args.output) if args.output else src.with_name(src.stem + "_scmmgpt.h5ad")
    if out.resolve() == src:
        raise ConfigError(f"--output {out} is the input file; pass --inplace to overwrite the input.")
    return out


def _write(adata, path: Path) -> None:
    """Write an .h5ad atomically (a temporary file in the same folder, then a rename)."""
    from ..utils.io import atomic_path

    with atomic_path(path, suffix=".h5ad") as tmp:
        adata.write_h5ad(tmp)
    print(f"wrote {path}")


def _data_kwargs(args) -> dict:
    kw = dict(layer=args.layer, use_raw=args.use_raw, gene_symbol_key=args.gene_symbol_key,
              min_coverage=args.min_coverage, progress=True,
              precision=args.precision)
    if args.batch_size is not None:
        kw["batch_size"] = args.batch_size
    return kw


def _shift_benchmark(args, command: str) -> int:
    """``scmmgpt benchmark mapping|ood``: the shifts of --shift, or the suite's of --data-dir."""
    from ..tasks.shift import MAPPING_SHIFTS, OOD_SHIFTS, ShiftBenchmark, parse_shift, run_shift_benchmark

    specs = args.shifts or ((MAPPING_SHIFTS if args.protocol == "mapping" else OOD_SHIFTS) if args.data_dir else ())
    if not specs:
        raise InputDataError(f"{args.protocol} needs --shift SRC>TGT (e.g. --shift 'ref.h5ad>query.h5ad') or "
                             "--data-dir (the folder of the suite's datasets, for its default shifts).")
    shifts = tuple(parse_shift(s, args.data_dir) for s in specs)
    kw = {k: v for k, v in (("steps", args.pretrain_steps), ("finetune_steps", args.finetune_steps)) if v is not None}
    b = (ShiftBenchmark.fast if args.fast else ShiftBenchmark)(
        shifts, protocol=args.protocol, label_key=args.label_key, config=args.config, overrides=list(args.overrides),
        seeds=(args.seed,) if args.fast else (args.seed, args.seed + 1, args.seed + 2), **kw)
    rec = run_shift_benchmark(b, args.out, progress=True, command=command)
    print(Path(args.out, "results.md").read_text())
    print(f"wrote {Path(args.out) / 'results.json'} ({rec['seconds']['total']:.0f} s)")
    return 0


@command("benchmark")
def _benchmark():
    """Run a paper protocol with baselines and write results.json + results.md (paper table layout).
    annotation: stage 1 on --pretrain-data, then zero-shot and fine-tuned on 10/20/30% of the types
    of --data (Table 3). description / generation: stage 1 + 2 on --data, beside a cell-sentence LM
    (Tables 1, 2, 4; genes-per-cell sweep of Fig. 6). representation: expression vs cell-sentence MLP
    (Fig. 2). batch: embedding silhouettes and UMAPs by type and batch (Fig. 5). clustering: Leiden
    ARI / NMI and the scIB metrics of scMMGPT, PCA and scVI embeddings of held-out cells (3 seeds).
    mapping / ood: train on a source, label a shifted target (zero-shot, reference-mapped, fine-tuned,
    beside logistic regression and k-NN on PCA; 3 seeds); --shift SRC[:COL=V]>TGT[:COL=V], or the
    suite's default shifts of --data-dir.
    --suite paper: all of them on the datasets of --data-dir, plus one README.md."""

    def add(p: argparse.ArgumentParser) -> None:
        p.add_argument("protocol", nargs="?", choices=["annotation", "description", "generation", "representation",
                                                       "batch", "clustering", "mapping", "ood"],
                       help="which table to reproduce")
        p.add_argument("--suite", choices=["paper"], help="run every protocol on --data-dir")
        p.add_argument("--data-dir", help="folder with the suite's .h5ad files (--suite)")
        p.add_argument("--data", nargs="+", help="evaluation .h5ad (counts); several for batch")
        p.add_argument("--pretrain-data", nargs="+",
                       help="annotation: what stage 1 is pre-trained on: an .h5ad, several (joined into a corpus), "
                            "or a corpus / shard folder; the --data dataset is left out of it")
        p.add_argument("--label-key", default="cell_type", help="obs column with cell type labels")
        p.add_argument("--out", required=True, help="output folder")
        p.add_argument("--fast", action="store_true", help="tiny schedules (for CI)")
        p.add_argument("--shift", dest="shifts", action="append", default=[], metavar="SRC[:COL=V1,V2]>TGT[:COL=V]",
                       help="mapping / ood: a source -> target shift (files relative to --data-dir if given); "
                            "repeat for several; default: the suite's shifts of --data-dir")
        p.add_argument("--pretrain-steps", type=int, default=None,
                       help="annotation / description / generation / batch / clustering / mapping / ood: stage-1 "
                            "steps (description / generation: default the config's train.max_steps)")
        p.add_argument("--finetune-steps", type=int, default=None, help="annotation: fine-tuning steps")
        p.add_argument("--pretrained", default=None,
                       help="annotation: the stage-1 model an earlier run of the same settings and seed saved "
                            "(OUT/pretrained); loaded instead of pre-training again")
        p.add_argument("--fractions", type=float, nargs="+", default=None, help="type fractions fine-tuned on")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--config", default="cpu-small", help="run configuration (model size, optimiser)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")

    def run(args: argparse.Namespace) -> int:
        command = "scmmgpt " + " ".join(args._argv)
        if args.suite:
            from ..tasks.suite import run_paper_suite

            if not args.data_dir:
                raise InputDataError("--suite paper needs --data-dir (the folder with the datasets).")
            run_paper_suite(args.data_dir, args.out, fast=args.fast, progress=True, command=command)
            print(Path(args.out, "README.md").read_text())
            return 0
        if args.protocol in ("mapping", "ood"):
            return _shift_benchmark(args, command)
        if not args.protocol or not args.data:
            raise InputDataError("Name a protocol and --data (e.g. `scmmgpt benchmark annotation --data X.h5ad "
                                 "--pretrain-data Y.h5ad --out DIR`), or use --suite paper --data-dir DIR.")
        for path in [*args.data, *(args.pretrain_data or [])]:
            if not Path(path).exists():
                raise InputDataError(f"No such file: {path}")
        common = dict(label_key=args.label_key, seed=args.seed)
        if args.protocol == "annotation":
            from ..tasks.benchmark import AnnotationBenchmark, run_annotation_benchmark

            if not args.pretrain_data:
                raise InputDataError("annotation needs --pretrain-data (the dataset stage 1 is pre-trained on).")
            kw = {k: v for k, v in (("pretrain_steps", args.pretrain_steps), ("finetune_steps", args.finetune_steps),
                                    ("fractions", tuple(args.fractions) if args.fractions else None)) if v is not None}
            kw.update(common, config=args.config, overrides=list(args.overrides), pretrained=args.pretrained)
            pre = args.pretrain_data[0] if len(args.pretrain_data) == 1 else tuple(args.pretrain_data)
            b = (AnnotationBenchmark.fast if args.fast else AnnotationBenchmark)(args.data[0], pre, **kw)
            rec = run_annotation_benchmark(b, args.out, progress=True, command=command)
        elif args.protocol in ("description", "generation"):
            from ..tasks.generative import GenerativeBenchmark, run_generative_benchmark

            parts = ("description", "gene_sweep") if args.protocol == "description" else ("generation",)
            kw = {"stage1_steps": args.pretrain_steps} if args.pretrain_steps else {}
            g = (GenerativeBenchmark.fast if args.fast else GenerativeBenchmark)(
                args.data[0], parts=parts, config=args.config, overrides=list(args.overrides), **common, **kw)
            rec = run_generative_benchmark(g, args.out, progress=True, command=command)
        elif args.protocol == "representation":
            from ..tasks.ablations import RepresentationAblation, run_representation_ablation

            r = (RepresentationAblation.fast if args.fast else RepresentationAblation)(
                args.data[0], label_key=args.label_key, seeds=(args.seed, args.seed + 1, args.seed + 2)
                if not args.fast else (args.seed,))
            rec = run_representation_ablation(r, args.out, command=command)
        elif args.protocol == "clustering":
            from ..tasks.clustering import ClusteringBenchmark, run_clustering_benchmark

            kw = {"steps": args.pretrain_steps} if args.pretrain_steps else {}
            c = (ClusteringBenchmark.fast if args.fast else ClusteringBenchmark)(
                tuple(args.data), label_key=args.label_key, config=args.config, overrides=list(args.overrides),
                seeds=(args.seed,) if args.fast else (args.seed, args.seed + 1, args.seed + 2), **kw)
            rec = run_clustering_benchmark(c, args.out, progress=True, command=command)
        else:
            from ..tasks.ablations import BatchView, run_batch_view

            kw = {"steps": args.pretrain_steps} if args.pretrain_steps else {}
            v = (BatchView.fast if args.fast else BatchView)(tuple(args.data), config=args.config,
                                                              overrides=list(args.overrides), **common, **kw)
            rec = run_batch_view(v, args.out, progress=True, command=command)
        print(Path(args.out, "results.md").read_text())
        print(f"wrote {Path(args.out) / 'results.json'} ({rec['seconds']['total']:.0f} s)")
        return 0

    return add, run


@command("embed")
def _embed():
    """Cell embeddings into .obsm["X_scmmgpt"] (and the aligned features into .obsm["X_scmmgpt_aligned"])."""

    def add(p: argparse.ArgumentParser) -> None:
        _add_model_args(p)
        p.add_argument("--no-aligned", action="store_true", help="skip the aligned (text-space) features")
        p.add_argument("--key-added", default="X_scmmgpt")

    def run(args: argparse.Namespace) -> int:
        from .. import tl
        from ..data.shards import is_shard_dir

        if is_shard_dir(args.data):
            return _embed_shards(args)
        out = _output_path(args)
        adata = _read(args)
        tl.embed(adata, _load_model(args, with_lm=False), aligned=not args.no_aligned, key_added=args.key_added,
                 **_data_kwargs(args))
        _write(adata, out)
        return 0

    return add, run


def _embed_shards(args) -> int:
    """``scmmgpt embed SHARDS/ -o emb.npy``: stream a shard folder into memory-mapped ``.npy`` files
    (``<cls>`` embeddings, and ``*_aligned.npy`` features), row i = the i-th cell of the shards."""
    from ..data.shards import ShardedCells
    from ..data.vocab import GeneVocab
    from ..inference import embed_to_disk

    shards = Path(args.data)
    out = Path(args.output) if args.output else shards / "scmmgpt_embedding.npy"
    if out.suffix != ".npy":
        raise ConfigError(f"Embeddings of a shard folder are written as .npy; got --output {out}.")
    if args.inplace or args.layer or args.use_raw or args.gene_symbol_key:
        raise ConfigError("--inplace, --layer, --use-raw and --gene-symbol-key apply to .h5ad input; a shard folder "
                          "was prepared by `scmmgpt shard` (pass them there).")
    model = _load_model(args, with_lm=False)
    if GeneVocab.from_json(shards / "vocab.json").tokens != model.vocab.tokens:
        raise InputDataError(f"{shards} was written with another gene vocabulary than the model's; re-run "
                             f"`scmmgpt shard ... --model {args.model or 'MODEL'} --out NEW_FOLDER`.")
    ds = model.dataset(ShardedCells(shards))
    aligned = None if args.no_aligned else out.with_name(out.stem + "_aligned.npy")
    embed_to_disk(model, ds, aligned, cell_out=out, batch_size=args.batch_size or 64,
                  precision=model.precision(args.precision))
    print(f"wrote {out}" + (f" and {aligned}" if aligned else "") + f" ({len(ds)} cells; row i is the i-th cell "
          "of scmmgpt.data.shards.load_shard_descriptions)")
    return 0


@command("annotate")
def _annotate():
    """Zero-shot cell types into .obs["scmmgpt_label"] from --labels, --labels-file, --labels-key or
    --descendants-of (one of them)."""

    def add(p: argparse.ArgumentParser) -> None:
        _add_model_args(p)
        src = p.add_mutually_exclusive_group(required=True)
        src.add_argument("--labels", nargs="+", help="candidate labels (names or CL ids)")
        src.add_argument("--labels-file", help="a text file with one candidate label per line")
        src.add_argument("--labels-key", help="obs column whose values are the candidates")
        src.add_argument("--descendants-of", help="a CL term (id or name): it and all its descendants")
        p.add_argument("--context", default=None, help='appended to each label text, e.g. "Sampled from the blood."')
        p.add_argument("--alpha", type=float, default=0.0, help="weight of the CTM re-ranking (0: CTC only)")
        p.add_argument("--no-backoff", dest="backoff", action="store_false",
                       help="score each label by its own text only, without the Cell Ontology back-off to "
                            "the model's trained ancestor types")
        p.add_argument("--top-k", type=int, default=3)
        p.add_argument("--min-score", type=float, default=None, help="below it a cell is 'unassigned'")
        p.add_argument("--min-margin", type=float, default=None,
                       help="a cell whose best label beats the second by less is 'unassigned'")
        p.add_argument("--zero-shot-model", default=None,
                       help="the model --model was fine-tuned from (scmmgpt finetune --task annotate): cells "
                            "unlike the fine-tuning cells are labelled by it, among the labels the fine-tuning "
                            "never saw")
        p.add_argument("--key-added", default="scmmgpt_label")

    def run(args: argparse.Namespace) -> int:
        from .. import tl

        labels = args.labels
        if args.labels_file:
            try:
                text = Path(args.labels_file).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise InputDataError(f"Cannot read the labels file {args.labels_file}: {exc}") from None
            labels = [line.strip() for line in text.splitlines() if line.strip()]
        out = _output_path(args)
        adata = _read(args)
        tl.annotate(adata, _load_model(args, with_lm=False), labels=labels, labels_key=args.labels_key,
                    descendants_of=args.descendants_of, context=args.context, alpha=args.alpha, backoff=args.backoff,
                    top_k=args.top_k,
                    min_score=args.min_score, min_margin=args.min_margin, key_added=args.key_added,
                    zero_shot_model=args.zero_shot_model, **_data_kwargs(args))
        counts = adata.obs[args.key_added].value_counts()
        print(counts[counts > 0].to_string())
        _write(adata, out)
        return 0

    return add, run


@command("transfer")
def _transfer():
    """Reference mapping: the labels of --reference (an .h5ad with --label-key) carried to the cells of
    DATA by a k-NN vote in the model's embedding, into .obs["scmmgpt_transfer"] with a confidence."""

    def add(p: argparse.ArgumentParser) -> None:
        _add_model_args(p)
        p.add_argument("--reference", required=True, help="labelled reference .h5ad (read like DATA)")
        p.add_argument("--label-key", default="cell_type", help="obs column of the reference's labels")
        p.add_argument("--space", choices=["aligned", "cls"], default="aligned",
                       help="aligned: the contrastive features; cls: the cell encoder's <cls> state")
        p.add_argument("-k", "--neighbours", type=int, default=15, help="reference neighbours per cell")
        p.add_argument("--min-confidence", type=float, default=0.5,
                       help="below this share of the neighbours' vote a cell is 'unassigned'")
        p.add_argument("--move-query", action="store_true",
                       help="move the query onto the reference by the difference of their mean embeddings first")
        p.add_argument("--key-added", default="scmmgpt_transfer")

    def run(args: argparse.Namespace) -> int:
        from .. import tl
        from ..data.io import read_h5ad

        if not Path(args.reference).is_file():
            raise InputDataError(f"No such reference file: {args.reference}")
        out = _output_path(args)
        adata = _read(args)
        tl.transfer_labels(adata, read_h5ad(args.reference), _load_model(args, with_lm=False),
                           label_key=args.label_key, space=args.space, k=args.neighbours,
                           min_confidence=args.min_confidence, move_query=args.move_query,
                           key_added=args.key_added, **_data_kwargs(args))
        counts = adata.obs[args.key_added].value_counts()
        print(counts[counts > 0].to_string())
        _write(adata, out)
        return 0

    return add, run


@command("explore")
def _explore():
    """A local web app over DATA: a map of the cells coloured by any obs column or gene, text search,
    zero-shot annotation, one cell's genes, labels and description, pseudo-cells from a description on
    the same map, and export. Binds to 127.0.0.1; nothing is fetched from the network."""

    def add(p: argparse.ArgumentParser) -> None:
        p.add_argument("data", help="the .h5ad to explore (the only file the server reads)")
        p.add_argument("--model", default=None,
                       help="model folder, `pbmc-small`, or a Hub repository owner/name@COMMIT (default: "
                            "$SCMMGPT_MODEL, else the model of the last `scmmgpt demo --set-default`)")
        p.add_argument("--device", default=None, help="torch device (default: cpu)")
        p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
        p.add_argument("--port", type=int, default=8000)
        p.add_argument("--allow-remote", action="store_true",
                       help="allow a --host other than this machine (the page runs the model, unauthenticated)")
        p.add_argument("--no-cache", action="store_true",
                       help="do not keep the embedding and the map in DATA.scmmgpt-explore/ beside the file")
        p.add_argument("--layer", default=None, help="matrix to read (default: X)")
        p.add_argument("--use-raw", action="store_true", help="read adata.raw.X")
        p.add_argument("--gene-symbol-key", default=None, help="var column with gene symbols")

    def run(args: argparse.Namespace) -> int:
        from ..explorer import ExplorerSession
        from ..explorer.server import check_host, serve

        check_host(args.host, args.allow_remote)
        if not Path(args.data).is_file():
            raise InputDataError(f"No such file: {args.data}")
        session = ExplorerSession.open(args.data, _load_model(args, with_lm=True), cache=not args.no_cache,
                                       layer=args.layer, use_raw=args.use_raw, gene_symbol_key=args.gene_symbol_key)
        serve(session, host=args.host, port=args.port, allow_remote=args.allow_remote)
        return 0

    return add, run


@command("describe")
def _describe():
    """A generated text description of every cell into .obs["scmmgpt_description"]."""

    def add(p: argparse.ArgumentParser) -> None:
        _add_model_args(p)
        p.add_argument("--max-new-tokens", type=int, default=64)
        p.add_argument("--sample", action="store_true", help="nucleus sampling instead of greedy decoding")
        p.add_argument("--temperature", type=float, default=1.0)
        p.add_argument("--top-p", type=float, default=0.9)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--key-added", default="scmmgpt_description")

    def run(args: argparse.Namespace) -> int:
        from .. import tl

        out = _output_path(args)
        adata = _read(args)
        tl.describe(adata, _load_model(args, with_lm=True), max_new_tokens=args.max_new_tokens,
                    do_sample=args.sample, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                    key_added=args.key_added, **_data_kwargs(args))
        for name, text in list(adata.obs[args.key_added].items())[:5]:
            print(f"{name}: {text}")
        _write(adata, out)
        return 0

    return add, run


@command("generate")
def _generate():
    """Pseudo-cells from text descriptions, written as a new .h5ad (-o)."""

    def add(p: argparse.ArgumentParser) -> None:
        p.add_argument("texts", nargs="+", help="descriptions (or cell type names / CL ids)")
        p.add_argument("-n", "--n-per-text", type=int, default=1, help="cells per text")
        p.add_argument("-o", "--output", required=True, help="output .h5ad")
        p.add_argument("--library-size", type=int, default=None,
                       help="sample counts at this many reads per cell (default 5000 when -n > 1)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--no-expand", action="store_true",
                       help="use cell type names as they are, not their ontology descriptions")
        _add_model_args(p, data=False)

    def run(args: argparse.Namespace) -> int:
        from .. import tl

        library = args.library_size if args.library_size is not None else (5000 if args.n_per_text > 1 else None)
        kw = {"batch_size": args.batch_size} if args.batch_size is not None else {}
        kw["precision"] = args.precision
        gen = tl.generate(_load_model(args, with_lm=True), args.texts, n_per_text=args.n_per_text,
                          library_size=library, expand=not args.no_expand, seed=args.seed, **kw)
        out = Path(args.output)
        if out.suffix != ".h5ad":
            raise ConfigError(f"--output must end in .h5ad, got {out}.")
        _write(gen, out)
        return 0

    return add, run


@command("search")
def _search():
    """The cells best matching a text query (printed; --csv writes them)."""

    def add(p: argparse.ArgumentParser) -> None:
        p.add_argument("data", help="input .h5ad")
        p.add_argument("query", nargs="+", help="query texts")
        p.add_argument("--top-k", type=int, default=10)
        p.add_argument("--csv", default=None, help="write the hits to this CSV file")
        p.add_argument("--no-expand", action="store_true",
                       help="use cell type names as they are, not their ontology descriptions")
        p.add_argument("--layer", default=None)
        p.add_argument("--use-raw", action="store_true")
        p.add_argument("--gene-symbol-key", default=None)
        _add_min_coverage(p)
        _add_model_args(p, data=False)

    def run(args: argparse.Namespace) -> int:
        from .. import tl

        adata = _read(args)
        hits = tl.search(adata, _load_model(args, with_lm=False), args.query, top_k=args.top_k,
                         expand=not args.no_expand, **_data_kwargs(args))
        cols = [c for c in ("query", "rank", "obs_name", "score") if c in hits.columns]
        print(hits[cols].to_string(index=False))
        if args.csv:
            hits.to_csv(args.csv, index=False)
            print(f"wrote {args.csv}")
        return 0

    return add, run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scmmgpt", description="scMMGPT: single-cell RNA-seq <-> language.")
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"scmmgpt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add, run) in COMMANDS.items():
        doc = (run.__doc__ or add.__doc__ or "").strip()
        p = sub.add_parser(name, help=doc.splitlines()[0] if doc else None, description=doc)
        add(p)
        p.set_defaults(_run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args._argv = list(sys.argv[1:] if argv is None else argv)     # recorded in benchmark results
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default", UserWarning)
            return int(args._run(args) or 0)
    except ScMMGPTError as exc:
        print(f"scmmgpt {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
