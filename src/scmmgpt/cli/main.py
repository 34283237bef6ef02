"""``scmmgpt`` command line: each subcommand calls one Python function.

User errors (:class:`~scmmgpt.errors.ScMMGPTError`) are printed as one message, exit status 2,
without a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from typing import Callable

from ..errors import ScMMGPTError

COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str):
    """Register ``(add_arguments, run)`` for a subcommand."""

    def wrap(fn):
        COMMANDS[name] = fn()
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

    def run(args: argparse.Namespace) -> int:
        from ..tasks.demo import run_demo

        m = run_demo(data=args.data, label_key=args.label_key, layer=args.layer, use_raw=args.use_raw,
                     out=args.out, fast=args.fast, seed=args.seed)
        a, d, g = m["annotation"], m["description"], m["generation"]
        print(f"scMMGPT demo on {m['data']}: {m['split']['test']} held-out test cells, {a['n_labels']} cell types "
              f"(chance Acc@1 {m['chance_acc1']:.3f})")
        print(f"  zero-shot annotation  Acc@1 {a['acc1']:.3f}  Acc@3 {a['acc3']:.3f}  macro-F1 {a['macro_f1']:.3f}")
        print(f"  cell -> text          BLEU-2 {d['bleu2']:.3f}  ROUGE-2 {d['rouge2']:.3f}  "
              f"right type named {d['type_named']:.3f}")
        print(f"  text -> cell          k-NN accuracy {g['knn_accuracy']:.3f} ({g['n_generated']} pseudo-cells)")
        print(f"  {m['seconds']['total']:.0f} s; report: {m['report']}  model: {m['model']}")
        if not args.fast:
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
        p.add_argument("--model", default=None, help="model folder to start from (required for stage 2)")
        _add_training_args(p)

    def run(args: argparse.Namespace) -> int:
        return _run_training(args, f"stage{args.stage}", args.model)

    return add, run


@command("finetune")
def _finetune():
    """Fine-tune a saved model for one task: annotate (CTC + CTM), describe (CDGen), generate (PCGen).
    --set data.types_fraction=0.5 trains on half the cell types (paper Table 3)."""

    def add(p: argparse.ArgumentParser) -> None:
        p.add_argument("--task", choices=("annotate", "describe", "generate"), required=True)
        p.add_argument("--model", required=True, help="model folder to start from")
        _add_training_args(p)

    def run(args: argparse.Namespace) -> int:
        return _run_training(args, args.task, args.model)

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
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default", UserWarning)
            return int(args._run(args) or 0)
    except ScMMGPTError as exc:
        print(f"scmmgpt {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
