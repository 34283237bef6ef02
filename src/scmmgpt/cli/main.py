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
    """Run the pipeline end to end on the bundled PBMC data (or --data): data checks, descriptions,
    the default model (SmolLM2 + MiniLM + cell encoder) and one pass of every objective on held-out
    cells. Training and the task report come with the training pipeline."""

    def add(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data", default=None, help=".h5ad file (default: bundled pbmc68k_reduced)")
        p.add_argument("--label-key", default="cell_type", help="obs column with cell type labels")
        p.add_argument("--layer", default=None, help="matrix to read (default: X)")
        p.add_argument("--use-raw", action="store_true", help="read adata.raw.X")
        p.add_argument("--out", default="demo_report", help="output folder")
        p.add_argument("--cell-preset", default="small", help="cell encoder size: tiny, small, scgpt-whole-human")

    def run(args: argparse.Namespace) -> int:
        from ..tasks.demo import run_pipeline_demo

        report = run_pipeline_demo(data=args.data, label_key=args.label_key, layer=args.layer,
                                   use_raw=args.use_raw, out=args.out, cell_preset=args.cell_preset)
        print(json.dumps(report, indent=2))
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
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default", UserWarning)
            return int(args._run(args) or 0)
    except ScMMGPTError as exc:
        print(f"scmmgpt {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
