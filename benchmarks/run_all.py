"""Every performance benchmark (``make bench``): throughput against the naive reference
(``perf.py``) and memory while streaming from shards as the data grows (``streaming.py``). Each
writes its JSON under ``benchmarks/results/``; this script also writes
``benchmarks/results/perf.md`` with both tables, the machine, the commands and the date.

``--quick`` runs small sizes (a few minutes on a laptop CPU).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import perf  # noqa: E402
import streaming  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default=None)
    p.add_argument("--model", choices=["cpu-small", "paper"], default="cpu-small")
    p.add_argument("--results", default=str(HERE / "results"), help="folder for the JSON and perf.md")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--skip-streaming", action="store_true")
    p.add_argument("--reuse-perf", action="store_true",
                   help="take perf.json from --results instead of measuring it again (tables only)")
    p.add_argument("--reuse-streaming", action="store_true",
                   help="take streaming.json from --results instead of measuring it again")
    args = p.parse_args(argv)
    out = Path(args.results)
    perf_args = ["--out", str(out / "perf.json"), "--model", args.model]
    perf_args += (["--device", args.device] if args.device else []) + (
        ["--batch-size", str(args.batch_size)] if args.batch_size else [])
    if args.quick:
        perf_args += ["--max-genes", "256", "--cells", "128", "--steps", "2"]
    rp = json.loads((out / "perf.json").read_text()) if args.reuse_perf else perf.main(perf_args)
    rs = None if args.skip_streaming else json.loads((out / "streaming.json").read_text()) if args.reuse_streaming \
        else streaming.main(
        ["--out", str(out / "streaming.json")] + (["--sizes", "10000", "50000"] if args.quick else []))
    m = rp["machine"]
    lines = [f"# Performance ({rp['date'][:10]}; {m['platform']}, {m['cpu_count']} CPUs, device {rp['device']}, "
             f"torch {m['torch']}, commit {str(m.get('git_commit'))[:10]})", "",
             f"`{rp['command']}`: model `{rp['model']}`, the same weights on the same cells. naive = every cell "
             "padded to max_genes, file order, every row's text encoded, each matching pair through every Q-Former "
             "layer (BLIP-2), fp32, eager attention, per-tensor AdamW, no KV cache; ours-fp32 / ours-bf16 = the library's paths at that precision.", ""]
    lines += perf.table_lines(rp)
    if rs is not None:
        lines += ["", f"`{rs['command']}` ({rs['date'][:10]}, commit {str(rs['machine'].get('git_commit'))[:10]}): "
                  "embedding from shards (tiny model), peak anonymous memory.", "",
                  "| cells | cells/s | peak RssAnon (MiB) | counts in memory (MiB) |", "|---|---|---|---|"]
    for r in (rs or {}).get("results", []):
        lines.append(f"| {r['cells']} | {r['cells_per_s']:.0f} | {r['rss_anon_peak'] / 2**20:.0f} | "
                     f"{r['csr_bytes'] / 2**20:.0f} |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "perf.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
