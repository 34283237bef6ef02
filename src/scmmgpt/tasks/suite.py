"""``scmmgpt benchmark --suite paper``: every protocol of the paper on the real datasets of a data
folder, each in its own sub-folder, and one ``README.md`` with all tables.

================  ===============================================  =====================================
part              data (file names in ``data_dir``)                 paper
================  ===============================================  =====================================
annotation        pbmc3k_clustifyr (stage 1 on soupx_pbmc4k)        Table 3
generative        pbmc3k_clustifyr                                  Tables 1, 2, 4; Fig. 6
representation    pbmc3k_clustifyr                                  Fig. 2
batch             symphony_pbmcs_small, muscat_kang_se              Fig. 5
clustering        symphony_pbmcs_small, muscat_kang_se, pbmc3k      later version: clustering
mapping           pbmc3k -> soupx_pbmc4k; symphony 3'v1 -> 5'       later version: reference mapping
ood               symphony 3' -> 5'; baron human -> mouse           later version: out of distribution
================  ===============================================  =====================================

The annotation part's fine-tuning fractions include 100% (every type seen: the later version's
fine-tuned annotation figure).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..errors import InputDataError
from ..utils.io import atomic_write_text

__all__ = ["SUITE_FILES", "run_paper_suite"]

SUITE_FILES = ("pbmc3k_clustifyr.h5ad", "soupx_pbmc4k.h5ad", "symphony_pbmcs_small.h5ad", "muscat_kang_se.h5ad",
               "cider_baron_pancreas.h5ad", "cluey_mouse_lung.h5ad")
PARTS = ("annotation", "generative", "representation", "batch", "clustering", "mapping", "ood")


def run_paper_suite(data_dir: str | Path, out: str | Path, *, fast: bool = False, parts=PARTS, progress: bool = False,
                    command: str | None = None) -> dict:
    """Run ``parts`` of the suite (full schedules, or ``fast`` CI ones); returns ``{part: record}``."""
    from .ablations import BatchView, RepresentationAblation, run_batch_view, run_representation_ablation
    from .benchmark import AnnotationBenchmark, machine_info, run_annotation_benchmark
    from .clustering import ClusteringBenchmark, run_clustering_benchmark
    from .generative import GenerativeBenchmark, run_generative_benchmark
    from .shift import MAPPING_SHIFTS, OOD_SHIFTS, ShiftBenchmark, parse_shift, run_shift_benchmark

    data_dir, out = Path(data_dir), Path(out)
    missing = [f for f in SUITE_FILES if not (data_dir / f).is_file()]
    if missing:
        raise InputDataError(f"{data_dir} lacks {missing}: the paper suite runs on these files (the project's "
                             "shared data folder); pass --data-dir.")
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise InputDataError(f"Unknown suite parts {sorted(unknown)}; choose from {PARTS}.")
    f = {name.split(".")[0]: str(data_dir / name) for name in SUITE_FILES}
    t0 = time.perf_counter()
    records, seconds = {}, {}
    for part in PARTS:
        if part not in parts:
            continue
        t = time.perf_counter()
        if part == "annotation":
            b = (AnnotationBenchmark.fast(f["pbmc3k_clustifyr"], f["soupx_pbmc4k"]) if fast else
                 AnnotationBenchmark(f["pbmc3k_clustifyr"], f["soupx_pbmc4k"], pretrain_steps=150, finetune_steps=40,
                                     overrides=["model.max_genes=128"]))
            records[part] = run_annotation_benchmark(b, out / part, progress=progress, command=command)
        elif part == "generative":
            g = (GenerativeBenchmark.fast if fast else GenerativeBenchmark)(f["pbmc3k_clustifyr"])
            records[part] = run_generative_benchmark(g, out / part, progress=progress, command=command)
        elif part == "representation":
            r = (RepresentationAblation.fast if fast else RepresentationAblation)(f["pbmc3k_clustifyr"])
            records[part] = run_representation_ablation(r, out / part, command=command)
        elif part == "batch":
            v = (BatchView.fast if fast else BatchView)((f["symphony_pbmcs_small"], f["muscat_kang_se"]))
            records[part] = run_batch_view(v, out / part, progress=progress, command=command)
        elif part == "clustering":
            c = (ClusteringBenchmark.fast((f["symphony_pbmcs_small"],)) if fast else
                 ClusteringBenchmark((f["symphony_pbmcs_small"], f["muscat_kang_se"], f["pbmc3k_clustifyr"])))
            records[part] = run_clustering_benchmark(c, out / part, progress=progress, command=command)
        else:       # mapping / ood; the CI version runs each protocol's symphony shift only
            specs = MAPPING_SHIFTS if part == "mapping" else OOD_SHIFTS
            shifts = tuple(parse_shift(x, data_dir) for x in specs)
            sb = (ShiftBenchmark.fast(tuple(x for x in shifts if "symphony" in x.source), protocol=part) if fast
                  else ShiftBenchmark(shifts, protocol=part))
            records[part] = run_shift_benchmark(sb, out / part, progress=progress, command=command)
        seconds[part] = round(time.perf_counter() - t, 1)
    seconds["total"] = round(time.perf_counter() - t0, 1)
    summary = {"command": command, "fast": fast, "data_dir": str(data_dir), "parts": list(records),
               "seconds": seconds, "machine": machine_info()}
    atomic_write_text(out / "suite.json", json.dumps(summary, indent=2))
    body = [f"# scMMGPT paper suite{' (fast)' if fast else ''}", "",
            f"Command: `{command}`" if command else "",
            f"Time: {seconds['total']:.0f} s on {summary['machine']['cpu_count']} CPUs "
            f"(CUDA: {summary['machine']['cuda']}); " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()
                                                                 if k != "total") + ".", ""]
    for part in records:
        body += [f"## {part}", "", (out / part / "results.md").read_text(), ""]
    atomic_write_text(out / "README.md", "\n".join(body))
    return records
