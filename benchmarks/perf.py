"""Throughput of scmmgpt against a naive reference of the same model, in the same run.

The reference does what the authors' code does: every cell padded to ``max_genes``, cells taken in
file order (no length bucketing), fp32, eager attention (SDPA's math kernel), and text generation
without the LM's KV cache. Ours: batches padded to their own longest cell, cells grouped by length
(inference sorts by length and restores the order; stage-2 training buckets by length), fused
SDPA kernels, bf16 autocast and fused AdamW on CUDA, and the KV cache. Both run the same weights
on the same cells, and the embeddings are checked to agree.

Model FLOPs: the timed training steps are replayed (forward + backward) under
:class:`torch.utils.flop_counter.FlopCounterMode`, which counts the matmul and attention FLOPs of
the real batches; achieved FLOP/s is that count over the timed seconds, and model FLOPs
utilisation (MFU) divides it by the GPU's dense bf16 peak (NVIDIA data sheets; CPU: not given).

Run: ``python benchmarks/perf.py [--out benchmarks/results/perf.json] [--device cuda]``;
``--model paper`` for the paper's sizes (12 x 512 cell encoder, BERT-base Q-Former, 1.17B Llama;
``benchmarks/paper_model.py``). Prints a table and writes JSON with the command, machine and date.
Ratios are measured side by side; absolute times are only meaningful for the machine named in the
JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from scmmgpt.data.dataset import CellBatch, CellTextDataset  # noqa: E402
from scmmgpt.inference import evaluation_mode, iter_batches  # noqa: E402


def pad_to(batch: CellBatch, length: int, pad_id: int, pad_value: float) -> CellBatch:
    """The naive reference's batch: every cell padded to ``length`` tokens."""
    B, L = batch.gene_ids.shape
    if L >= length:
        return batch
    extra = length - L
    dev = batch.gene_ids.device
    batch.gene_ids = torch.cat([batch.gene_ids, torch.full((B, extra), pad_id, dtype=batch.gene_ids.dtype, device=dev)], 1)
    batch.values = torch.cat([batch.values, torch.full((B, extra), pad_value, dtype=batch.values.dtype, device=dev)], 1)
    batch.padding_mask = torch.cat([batch.padding_mask, torch.ones((B, extra), dtype=torch.bool, device=dev)], 1)
    return batch


def _sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


#: Dense bf16 tensor-core peak FLOP/s (NVIDIA data sheets), matched against the device name in order.
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("H800", 989e12), ("A100", 312e12),
             ("L40S", 362e12), ("L4", 121e12), ("4090", 165e12))


def peak_flops(device) -> float | None:
    if not str(device).startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    return next((v for k, v in PEAK_BF16 if k in name), None)


def _count_cpu_attention() -> None:
    """``FlopCounterMode`` knows the CUDA SDPA kernels but not the CPU flash kernel, whose FLOPs it
    would count as 0; register it with torch's own SDPA formulas."""
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    fwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if fwd is None or bwd is None or fwd in fc.flop_registry or fwd.default in fc.flop_registry:
        return
    fc.register_flop_formula(fwd)(lambda q, k, v, *a, out_shape=None, **kw: fc.sdpa_flop_count(q, k, v))
    fc.register_flop_formula(bwd)(lambda g, q, k, v, *a, out_shape=None, **kw: fc.sdpa_backward_flop_count(g, q, k, v))


_count_cpu_attention()


def _mode(device, naive: bool):
    """Ours: fused SDPA, bf16 autocast on CUDA. Naive: fp32 and SDPA's math (eager) kernel."""
    from contextlib import ExitStack

    stack = ExitStack()
    if naive:
        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
    elif str(device).startswith("cuda"):
        stack.enter_context(torch.autocast("cuda", dtype=torch.bfloat16))
    return stack


def _reset_peak(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if str(device).startswith("cuda") else None


def embed(model, ds, batch_size: int, *, naive: bool) -> tuple[float, np.ndarray]:
    """Cells/s of encoding every cell, and the query features in dataset order. Ours is the
    library's ``ScMMGPT.encode`` (length-sorted batches); the reference pads every cell to
    ``max_genes`` and keeps file order."""
    dev = model.device
    _sync(dev)
    t = time.perf_counter()
    if naive:
        feats = []
        with evaluation_mode(model.net), _mode(dev, naive=True):
            for batch in iter_batches(model, ds, batch_size):
                batch = pad_to(batch, model.config.max_genes + 1, model.vocab.pad_id, model.config.cell.pad_value)
                feats.append(model.net.encode_cells(batch.gene_ids, batch.values, batch.padding_mask).features.float().cpu())
        out = torch.cat(feats)
    else:
        with _mode(dev, naive=False):
            out = model.encode(ds, batch_size=batch_size).features
    _sync(dev)
    return len(ds) / (time.perf_counter() - t), out.numpy()


def train_steps(model, ds, batch_size: int, steps: int, stage: str, *, naive: bool, measured=None,
                count_flops: bool = False) -> dict:
    """Optimiser steps of ``stage``: cells/s, real (unpadded) cell tokens/s and, with ``count_flops``,
    the model FLOPs of the timed steps (replayed under ``FlopCounterMode`` after timing)."""
    from scmmgpt.data.dataset import LengthBucketSampler

    dev = model.device
    net = model.net
    spec = net.set_trainable(stage)
    net.train()
    cuda = str(dev).startswith("cuda")
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-5,
                            fused=(cuda and not naive) or None)
    bucket = (not naive) and not spec.random_batches
    sampler = LengthBucketSampler(ds.lengths(), batch_size, seed=0, drop_last=True, pool_batches=50 if bucket else 1)
    collate = model.collator()
    gen = torch.Generator().manual_seed(0)
    batches = [b for _, b in zip(range(steps + 1), iter(sampler))]
    cells = tokens = 0
    _reset_peak(dev)

    def batch_of(idx):
        batch = collate([ds[int(j)] for j in idx]).to(dev, non_blocking=True)
        if naive:
            batch = pad_to(batch, model.config.max_genes + 1, model.vocab.pad_id, model.config.cell.pad_value)
        return batch

    for i, idx in enumerate(batches):
        batch = batch_of(idx)
        if i == 1:                       # the first step warms up; time the rest
            _sync(dev)
            t = time.perf_counter()
        with _mode(dev, naive):
            loss = net(batch, spec, measured, gen).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 1:
            cells += len(batch)
            tokens += int((~batch.padding_mask).sum())
    _sync(dev)
    dt = time.perf_counter() - t
    out = {"cells_per_s": cells / dt, "tokens_per_s": tokens / dt, "cuda_max_allocated": _peak(dev)}
    if count_flops:
        counter = FlopCounterMode(display=False)
        with counter:
            for idx in batches[1:]:
                with _mode(dev, naive):
                    loss = net(batch_of(idx), spec, measured, gen).loss
                loss.backward()
                opt.zero_grad(set_to_none=True)
        flops = counter.get_total_flops()
        out.update(model_flops=flops, flops_per_s=flops / dt)
        if peak_flops(dev):
            out["mfu"] = flops / dt / peak_flops(dev)
    net.eval()
    return out


def describe(model, ds, n: int, batch_size: int, max_new_tokens: int, *, naive: bool) -> float:
    """Generated LM tokens/s (greedy, batched), with (ours) or without (naive) the KV cache."""
    dev = model.device
    net = model.net
    produced = 0
    _sync(dev)
    t = time.perf_counter()
    with evaluation_mode(net), _mode(dev, naive):
        for batch in iter_batches(model, ds, batch_size, indices=np.arange(n)):
            cell = net.encode_cells(batch.gene_ids, batch.values, batch.padding_mask)
            prefix = net.cell_prefix(cell)
            mask = torch.ones(prefix.shape[:2], dtype=torch.long, device=dev)
            tok = model.lm_tokenizer
            out = net.lm.generate(inputs_embeds=prefix, attention_mask=mask, do_sample=False,
                                    max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                    pad_token_id=tok.pad_token_id or tok.eos_token_id, use_cache=not naive)
            produced += out.shape[0] * out.shape[1]
    _sync(dev)
    return produced / (time.perf_counter() - t)


def main(argv=None) -> dict:
    from scmmgpt.data.labelled import DataConfig, load_labelled
    from scmmgpt.models.scmmgpt import ScMMGPT
    from scmmgpt.tasks.benchmark import machine_info
    from scmmgpt.train.run import load_run_config

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "pbmc3k_clustifyr.h5ad"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "perf.json"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--max-genes", type=int, nargs="+", default=[256, 2048])
    p.add_argument("--cells", type=int, default=512, help="cells embedded per measurement")
    p.add_argument("--steps", type=int, default=6, help="timed training steps per measurement")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--describe-cells", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--model", choices=["cpu-small", "paper"], default="cpu-small",
                   help="cpu-small: the packaged CPU config (SmolLM2-135M); paper: 12 x 512 cell encoder, "
                        "BERT-base Q-Former, 1.17B Llama (random weights, benchmarks/paper_model.py)")
    p.add_argument("--assets-dir", default=str(ROOT / ".cache" / "bench-assets"),
                   help="where --model paper writes its synthetic BERT and LM folders")
    p.add_argument("--lm-layers", type=int, default=None, help="--model paper: fewer LM layers (smoke tests)")
    p.add_argument("--bert-layers", type=int, default=None, help="--model paper: fewer BERT layers (smoke tests)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    rc = load_run_config("cpu-small")
    lab = load_labelled(DataConfig(path=args.data, split=(0.8, 0.1, 0.1), seed=0), target_sum=rc.model.target_sum)
    if args.model == "paper":
        from paper_model import n_parameters, paper_model_config

        rc.model = paper_model_config(args.assets_dir, lm_layers=args.lm_layers, bert_layers=args.bert_layers,
                                      lm_dtype="bfloat16" if args.device.startswith("cuda") else "float32")
    rows: list[dict] = []
    sizes: dict = {}
    for max_genes in args.max_genes:
        rc.model.max_genes = max_genes
        torch.manual_seed(0)
        model = ScMMGPT.build(rc.model, lab.vocab, with_lm=True).to(args.device)
        model.net.eval()
        if args.model == "paper":
            sizes = {"cell_encoder": n_parameters(model.net.cell_encoder), "qformer": n_parameters(model.net.qformer),
                     "lm": n_parameters(model.lm)}
        ds = lab.dataset("train", max_genes=max_genes, with_targets=True)
        n = min(args.cells, len(ds))
        part = CellTextDataset(ds.cells.subset(np.arange(n)), ds.texts[:n], cls_id=lab.vocab.cls_id,
                               max_genes=max_genes)
        lengths = part.lengths()
        row = {"max_genes": max_genes, "mean_tokens": float(lengths.mean()), "max_tokens": int(lengths.max()),
               "vocab_size": len(lab.vocab)}
        naive_e, f_naive = embed(model, part, args.batch_size * 4, naive=True)
        ours_e, f_ours = embed(model, part, args.batch_size * 4, naive=False)
        row["embed_max_abs_diff"] = float(np.abs(f_naive - f_ours).max())
        row["embed_cells_per_s"] = {"naive": naive_e, "ours": ours_e, "ratio": ours_e / naive_e}
        for stage in ("stage1", "stage2"):
            meas = torch.from_numpy(lab.cells.measured).to(args.device) if stage == "stage2" else None
            n = train_steps(model, ds, args.batch_size, args.steps, stage, naive=True, measured=meas)
            o = train_steps(model, ds, args.batch_size, args.steps, stage, naive=False, measured=meas,
                            count_flops=True)
            row[f"{stage}_cells_per_s"] = {"naive": n["cells_per_s"], "ours": o["cells_per_s"],
                                           "ratio": o["cells_per_s"] / n["cells_per_s"]}
            row[f"{stage}_tokens_per_s"] = {"naive": n["tokens_per_s"], "ours": o["tokens_per_s"]}
            row[f"{stage}_flops"] = {k: o.get(k) for k in ("model_flops", "flops_per_s", "mfu")}
            row[f"{stage}_cuda_max_allocated"] = {"naive": n["cuda_max_allocated"], "ours": o["cuda_max_allocated"]}
        if max_genes == args.max_genes[0]:
            nd = describe(model, part, args.describe_cells, args.describe_cells, args.new_tokens, naive=True)
            od = describe(model, part, args.describe_cells, args.describe_cells, args.new_tokens, naive=False)
            row["describe_tokens_per_s"] = {"naive": nd, "ours": od, "ratio": od / nd}
            import warnings

            from scmmgpt import tl

            prompts = sorted(set(part.texts))[:8]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")       # an untrained model: throughput only
                _sync(args.device)
                t = time.perf_counter()
                gen = tl.generate(model, prompts, n_per_text=8, library_size=2000, device=args.device)
                _sync(args.device)
            row["generate_cells_per_s"] = {"ours": gen.n_obs / (time.perf_counter() - t)}
        rows.append(row)
        del model
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    record = {"benchmark": "perf", "command": "python " + " ".join([str(Path(sys.argv[0]))] + sys.argv[1:]),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine_info(),
              "device": args.device, "data": args.data, "settings": vars(args), "model": args.model,
              "parameters": sizes or None, "peak_rss_bytes": peak,
              "cuda_max_allocated": torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else None,
              "seconds": round(time.perf_counter() - t0, 1), "results": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    print(f"{'max_genes':>9} {'measure':<22} {'naive':>10} {'ours':>10} {'ratio':>7}")
    for r in rows:
        for key in ("embed_cells_per_s", "stage1_cells_per_s", "stage2_cells_per_s", "describe_tokens_per_s",
                    "generate_cells_per_s"):
            if key in r:
                v = r[key]
                naive = f"{v['naive']:>10.1f}" if "naive" in v else f"{'-':>10}"
                ratio = f"{v['ratio']:>6.2f}x" if "ratio" in v else ""
                print(f"{r['max_genes']:>9} {key:<22} {naive} {v['ours']:>10.1f} {ratio}")
        for stage in ("stage1", "stage2"):
            f = r[f"{stage}_flops"]
            mfu = f" MFU {100 * f['mfu']:.1f}%" if f.get("mfu") else ""
            print(f"{r['max_genes']:>9} {stage} model FLOP/s (ours): {f['flops_per_s'] / 1e12:.3f} T{mfu}")
    print(f"peak RSS {peak / 2**30:.2f} GiB; {record['seconds']} s; written to {args.out}")
    return record


if __name__ == "__main__":
    main()
