"""Throughput of scmmgpt against a naive reference of the same model, in the same run.

Three columns, the same weights on the same cells:

* ``naive`` does what the authors' code does: every cell padded to ``max_genes``, cells taken in
  file order (no length bucketing), every row's text through the text tower and the LM (no
  de-duplication), each matching pair's queries and text through every Q-Former layer (BLIP-2's
  ITM), fp32, eager attention (SDPA's math kernel), torch's default AdamW, and text generation
  without the LM's KV cache;
* ``ours-fp32``: the library's paths in fp32: batches padded to their own longest cell, cells
  grouped by length (inference sorts by length and restores the order; stage-2 training buckets by
  length), each distinct description encoded once, fused SDPA kernels, fused AdamW, the KV cache;
* ``ours-bf16``: the same under ``precision="bf16"`` (what ``auto`` picks on hardware with native
  bf16 matmul), with the frozen LM held in bf16 as training and inference hold it.

The embeddings of the naive and fp32 paths are checked to agree, and bf16's against fp32's
(per-cell cosine); so are the matching logits of the two matching computations.

Model FLOPs: the timed training steps are replayed (forward + backward) under
:class:`torch.utils.flop_counter.FlopCounterMode`, which counts the matmul and attention FLOPs of
the real batches; achieved FLOP/s is that count over the timed seconds. It is given as a share of
this machine's own matmul peak, measured in the same run (fp32 and bf16 ``torch.mm`` of large
square-ish shapes), and on a GPU also as model FLOPs utilisation (MFU) against the dense bf16
data-sheet peak.

Run: ``python benchmarks/perf.py [--out benchmarks/results/perf.json] [--device cuda]``;
``--model paper`` for the paper's sizes (12 x 512 cell encoder, BERT-base Q-Former, 1.17B Llama;
``benchmarks/paper_model.py``). Prints a table and writes JSON with the command, machine and date.
Ratios are measured side by side; absolute times are only meaningful for the machine named in the
JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
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


VARIANTS = ("naive", "fp32", "bf16")


@contextlib.contextmanager
def _paths(net, variant: str):
    """naive: BLIP-2's matching computation (every pair's queries and text through every Q-Former
    layer, :meth:`~scmmgpt.modules.qformer.QFormer.forward_match_per_pair`), cross-attention over
    projected keys and values (never folded), and CDGen's vocabulary logits at every position of
    the LM's sequence; ours: the library's."""
    if variant != "naive":
        yield
        return
    from scmmgpt.models import network

    cross = [layer.crossattention for layer in net.qformer.qformer_layers() if layer.crossattention is not None]
    saved = network._decoder_and_head, network._keeps_logits
    net.qformer.forward_match = net.qformer.forward_match_per_pair
    network._decoder_and_head = lambda lm: None
    network._keeps_logits = lambda lm: False
    for att in cross:
        att.folds = lambda kv: False
    try:
        yield
    finally:
        del net.qformer.forward_match
        network._decoder_and_head, network._keeps_logits = saved
        for att in cross:
            del att.folds


def match_agreement(model, ds, batch_size: int) -> float:
    """Largest difference between the CTM logits of the library's matching path and of the per-pair
    reference, on one batch's positive and shifted (negative) pairs, in eval mode."""
    net = model.net
    batch = model.collator()([ds[i] for i in range(batch_size)]).to(model.device)
    idx = torch.arange(batch_size, device=model.device)
    cells, texts = torch.cat([idx, idx]), torch.cat([idx, idx.roll(1)])
    with evaluation_mode(net), torch.no_grad():
        out = net.encode_cells(batch.gene_ids, batch.values, batch.padding_mask)
        ours = net.match_logits(out.states, out.padding, batch.text_input_ids, batch.text_attention_mask, cells, texts)
        with _paths(net, "naive"):
            ref = net.match_logits(out.states, out.padding, batch.text_input_ids, batch.text_attention_mask, cells, texts)
    return float((ours - ref).abs().max())


def _mode(device, variant: str):
    """naive: fp32 and SDPA's math (eager) kernel; fp32: nothing; bf16: the library's bf16 autocast."""
    from contextlib import nullcontext

    from scmmgpt.utils.precision import resolve_precision

    if variant == "naive":
        return sdpa_kernel(SDPBackend.MATH)
    if variant == "fp32":
        return nullcontext()
    return resolve_precision("bf16", device, quiet=True).autocast()


def matmul_peak(device, dtype, seconds: float = 1.0) -> float:
    """This machine's matmul FLOP/s in ``dtype``: the best of a few large shapes, timed here."""
    best = 0.0
    g = torch.Generator(device="cpu").manual_seed(0)
    for m, k, n in ((4096, 1024, 1024), (2048, 2048, 2048), (4096, 4096, 1024)):
        a = torch.randn(m, k, generator=g).to(device, dtype)
        b = torch.randn(k, n, generator=g).to(device, dtype)
        for _ in range(2):
            a @ b
        _sync(device)
        t, reps = time.perf_counter(), 0
        while time.perf_counter() - t < seconds / 3:
            a @ b
            reps += 1
        _sync(device)
        best = max(best, 2 * m * k * n * reps / (time.perf_counter() - t))
    return best


def _distinct_texts(batch: CellBatch) -> CellBatch:
    """The naive reference encodes every row's text, as the authors' code does: its texts are made
    distinct (which also turns off same-description positives; throughput only)."""
    if batch.texts is not None:
        batch.texts = [f"{t}\x00{i}" for i, t in enumerate(batch.texts)]
    return batch


def _reset_peak(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if str(device).startswith("cuda") else None


def embed(model, ds, batch_size: int, *, variant: str) -> tuple[float, np.ndarray]:
    """Cells/s of encoding every cell, and the query features in dataset order. Ours is the
    library's ``ScMMGPT.encode`` (length-sorted batches) at fp32 or bf16; the reference pads every
    cell to ``max_genes`` and keeps file order."""
    dev = model.device
    _sync(dev)
    t = time.perf_counter()
    if variant == "naive":
        feats = []
        with evaluation_mode(model.net), _mode(dev, "naive"), _paths(model.net, "naive"):
            for batch in iter_batches(model, ds, batch_size):
                batch = pad_to(batch, model.config.max_genes + 1, model.vocab.pad_id, model.config.cell.pad_value)
                feats.append(model.net.encode_cells(batch.gene_ids, batch.values, batch.padding_mask).features.float().cpu())
        out = torch.cat(feats)
    else:
        out = model.encode(ds, batch_size=batch_size, precision=variant).features
    _sync(dev)
    return len(ds) / (time.perf_counter() - t), out.float().numpy()


def train_steps(model, ds, batch_size: int, steps: int, stage: str, *, variant: str, measured=None,
                count_flops: bool = False) -> dict:
    """Optimiser steps of ``stage``: cells/s, real (unpadded) cell tokens/s and, with ``count_flops``,
    the model FLOPs of the timed steps (replayed under ``FlopCounterMode`` after timing)."""
    from scmmgpt.data.dataset import LengthBucketSampler

    dev = model.device
    net = model.net
    spec = net.set_trainable(stage)
    net.train()
    naive = variant == "naive"
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-5, fused=(not naive) or None)
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
            batch = _distinct_texts(batch)
        return batch

    for i, idx in enumerate(batches):
        batch = batch_of(idx)
        if i == 1:                       # the first step warms up; time the rest
            _sync(dev)
            t = time.perf_counter()
        with _mode(dev, variant), _paths(net, variant):
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
                with _mode(dev, variant), _paths(net, variant):
                    loss = net(batch_of(idx), spec, measured, gen).loss
                loss.backward()
                opt.zero_grad(set_to_none=True)
        flops = counter.get_total_flops()
        out.update(model_flops=flops, flops_per_s=flops / dt)
        if peak_flops(dev):
            out["mfu"] = flops / dt / peak_flops(dev)
    net.eval()
    return out


def describe(model, ds, n: int, batch_size: int, max_new_tokens: int, *, variant: str) -> float:
    """Generated LM tokens/s (greedy, batched), with (ours) or without (naive) the KV cache."""
    dev = model.device
    net = model.net
    produced = 0
    _sync(dev)
    t = time.perf_counter()
    naive = variant == "naive"
    with evaluation_mode(net), _mode(dev, variant):
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
    p.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"],
                   help="the library's columns beside naive; a CPU without bf16 units emulates bf16 (its matmul "
                        "runs at ~1%% of fp32's on an AVX2 CPU), so use --precisions fp32 there")
    p.add_argument("--no-profile", action="store_true",
                   help="skip the op profile of a stage-1 step (bf16, or fp32 without the bf16 column)")
    args = p.parse_args(argv)
    if "fp32" not in args.precisions:
        p.error("--precisions must include fp32: the agreement checks compare against it")
    variants = ("naive", *(v for v in ("fp32", "bf16") if v in args.precisions))
    ours = variants[1:]
    t0 = time.perf_counter()
    from scmmgpt.utils.precision import native_bf16

    dev = torch.device(args.device)
    peaks = {"fp32": matmul_peak(dev, torch.float32), "bf16": matmul_peak(dev, torch.bfloat16)}
    print(f"measured matmul peak: fp32 {peaks['fp32'] / 1e12:.3f} TFLOP/s, bf16 {peaks['bf16'] / 1e12:.3f} TFLOP/s "
          f"(native bf16: {native_bf16(dev)})")
    rc = load_run_config("cpu-small")
    lab = load_labelled(DataConfig(path=args.data, split=(0.8, 0.1, 0.1), seed=0), target_sum=rc.model.target_sum)
    if args.model == "paper":
        from paper_model import n_parameters, paper_model_config

        rc.model = paper_model_config(args.assets_dir, lm_layers=args.lm_layers, bert_layers=args.bert_layers)
    rows: list[dict] = []
    sizes: dict = {}
    profile = None
    for max_genes in args.max_genes:
        rc.model.max_genes = max_genes
        models = {}
        for v in ours:                   # the same weights; bf16 holds its frozen LM in bf16
            torch.manual_seed(0)
            models[v] = ScMMGPT.build(dataclasses.replace(rc.model, lm=dataclasses.replace(
                rc.model.lm, dtype={"fp32": "float32", "bf16": "bfloat16"}[v])), lab.vocab, with_lm=True).to(dev)
        if "bf16" in models:
            models["bf16"].net.load_state_dict(models["fp32"].net.state_dict())
        by_variant = {"naive": models["fp32"], **models}
        if args.model == "paper":
            m = models["fp32"]
            sizes = {"cell_encoder": n_parameters(m.net.cell_encoder), "qformer": n_parameters(m.net.qformer),
                     "lm": n_parameters(m.lm)}
        ds = lab.dataset("train", max_genes=max_genes, with_targets=True)
        n = min(args.cells, len(ds))
        part = CellTextDataset(ds.cells.subset(np.arange(n)), ds.texts[:n], cls_id=lab.vocab.cls_id,
                               max_genes=max_genes)
        lengths = part.lengths()
        row: dict = {"max_genes": max_genes, "mean_tokens": float(lengths.mean()), "max_tokens": int(lengths.max()),
                     "vocab_size": len(lab.vocab)}
        feats = {}
        speed = {}
        for v in variants:
            speed[v], feats[v] = embed(by_variant[v], part, args.batch_size * 4, variant=v)
        row["embed_max_abs_diff"] = float(np.abs(feats["naive"] - feats["fp32"]).max())
        if "bf16" in feats:
            a, b = feats["fp32"].reshape(n, -1), feats["bf16"].reshape(n, -1)
            row["embed_bf16_min_cosine"] = float(((a * b).sum(1) / np.linalg.norm(a, axis=1)
                                                  / np.linalg.norm(b, axis=1)).min())
        row["embed_cells_per_s"] = _with_ratios(speed)
        row["match_max_abs_diff"] = match_agreement(models["fp32"], part, args.batch_size)
        for stage in ("stage1", "stage2"):
            meas = torch.from_numpy(lab.cells.measured).to(dev) if stage == "stage2" else None
            res = {v: train_steps(by_variant[v], ds, args.batch_size, args.steps, stage, variant=v, measured=meas,
                                  count_flops=v != "naive") for v in variants}
            row[f"{stage}_cells_per_s"] = _with_ratios({v: r["cells_per_s"] for v, r in res.items()})
            row[f"{stage}_tokens_per_s"] = {v: r["tokens_per_s"] for v, r in res.items()}
            row[f"{stage}_flops"] = {v: {"model_flops": res[v]["model_flops"], "flops_per_s": res[v]["flops_per_s"],
                                         "share_of_measured_peak": res[v]["flops_per_s"] / peaks[v],
                                         "mfu": res[v].get("mfu")} for v in ours}
            row[f"{stage}_cuda_max_allocated"] = {v: r["cuda_max_allocated"] for v, r in res.items()}
        if max_genes == args.max_genes[0]:
            row["describe_tokens_per_s"] = _with_ratios({v: describe(by_variant[v], part, args.describe_cells,
                                                                     args.describe_cells, args.new_tokens, variant=v)
                                                         for v in variants})
            import warnings

            from scmmgpt import tl

            prompts = sorted(set(part.texts))[:8]
            gen_speed = {}
            for v in ours:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")       # an untrained model: throughput only
                    _sync(dev)
                    t = time.perf_counter()
                    gen = tl.generate(by_variant[v], prompts, n_per_text=8, library_size=2000, device=args.device,
                                      precision=v)
                    _sync(dev)
                gen_speed[v] = gen.n_obs / (time.perf_counter() - t)
            row["generate_cells_per_s"] = gen_speed
            if not args.no_profile:
                profile = profile_step(by_variant[ours[-1]], ds, args.batch_size, "stage1", precision=ours[-1])
        rows.append(row)
        del models, by_variant
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    record = {"benchmark": "perf", "command": "python " + " ".join([str(Path(sys.argv[0]))] + sys.argv[1:]),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine_info(),
              "device": args.device, "native_bf16": native_bf16(dev), "matmul_peak_flops": peaks,
              "data": args.data, "settings": vars(args), "model": args.model,
              "parameters": sizes or None, "peak_rss_bytes": peak,
              "cuda_max_allocated": torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else None,
              "profile_stage1": profile, "seconds": round(time.perf_counter() - t0, 1), "results": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    print("\n".join(table_lines(record)))
    print(f"peak RSS {peak / 2**30:.2f} GiB; {record['seconds']} s; written to {args.out}")
    return record


MEASURES = ("embed_cells_per_s", "stage1_cells_per_s", "stage2_cells_per_s", "describe_tokens_per_s",
            "generate_cells_per_s")


def _with_ratios(speed: dict) -> dict:
    out = dict(speed)
    for v in ("fp32", "bf16"):
        if "naive" in speed and v in speed:
            out[f"ratio_{v}"] = speed[v] / speed["naive"]
    return out


def table_lines(record: dict) -> list[str]:
    """The Markdown tables of a perf record: throughput by variant, then FLOP/s against the peaks."""
    pk = record["matmul_peak_flops"]
    lines = ["| max_genes | measure | naive | ours-fp32 | ours-bf16 | fp32 / naive | bf16 / naive |",
             "|---|---|---|---|---|---|---|"]
    for r in record["results"]:
        for key in MEASURES:
            if key in r:
                v = r[key]
                cells = [f"{v[k]:.1f}" if k in v else "–" for k in VARIANTS]
                ratios = [f"{v[f'ratio_{k}']:.2f}x" if f"ratio_{k}" in v else "–" for k in ("fp32", "bf16")]
                lines.append(f"| {r['max_genes']} | {key} | " + " | ".join(cells + ratios) + " |")
    lines += [""] + [f"Agreement at {r['max_genes']} genes: embeddings naive vs fp32, largest difference "
                     f"{r['embed_max_abs_diff']:.1e}; "
                     + (f"bf16 vs fp32, smallest per-cell cosine {r['embed_bf16_min_cosine']:.5f}; "
                        if "embed_bf16_min_cosine" in r else "")
                     + f"matching logits, library vs per-pair reference, largest "
                     f"difference {r.get('match_max_abs_diff', float('nan')):.1e}." for r in record["results"]]
    lines += ["", f"Model FLOP/s of the timed training steps (`FlopCounterMode`), as a share of this machine's matmul "
              f"peak measured in the same run (fp32 {pk['fp32'] / 1e12:.3f}, bf16 {pk['bf16'] / 1e12:.3f} TFLOP/s"
              f"; native bf16: {record['native_bf16']}); MFU against the GPU's dense bf16 data-sheet peak:", "",
              "| max_genes | stage | precision | GFLOP/step | TFLOP/s | share of measured peak | MFU |",
              "|---|---|---|---|---|---|---|"]
    for r in record["results"]:
        steps = record["settings"]["steps"]
        for stage in ("stage1", "stage2"):
            for v, f in r[f"{stage}_flops"].items():
                mfu = f"{100 * f['mfu']:.1f}%" if f.get("mfu") else "–"
                lines.append(f"| {r['max_genes']} | {stage} | {v} | {f['model_flops'] / steps / 1e9:.1f} | "
                             f"{f['flops_per_s'] / 1e12:.3f} | {100 * f['share_of_measured_peak']:.0f}% | {mfu} |")
    prof = record.get("profile_stage1") or record.get("profile_stage1_bf16")   # the key of records before 2026-12-07
    if prof:
        lines += ["", f"Where a {prof.get('precision', 'bf16')} stage-1 step's time goes (`torch.profiler`, self time, "
                  f"max_genes {record['results'][0]['max_genes']}, {prof['ms_per_step']:.0f} ms per step):", "",
                  "| op | share |", "|---|---|"]
        lines += [f"| {name} | {100 * share:.0f}% |" for name, share in prof["ops"]]
    return lines


def profile_step(model, ds, batch_size: int, stage: str, steps: int = 3, *, precision: str = "bf16") -> dict:
    """Self time per op (largest first) of ``steps`` training steps in ``precision``, under
    ``torch.profiler``."""
    from torch.profiler import ProfilerActivity, profile

    from scmmgpt.data.dataset import LengthBucketSampler

    net = model.net
    spec = net.set_trainable(stage)
    net.train()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-5, fused=True)
    sampler = LengthBucketSampler(ds.lengths(), batch_size, seed=1, drop_last=True, pool_batches=1)
    collate = model.collator()
    batches = [collate([ds[int(j)] for j in idx]).to(model.device) for _, idx in zip(range(steps + 1), iter(sampler))]
    gen = torch.Generator().manual_seed(0)

    def step(b):
        with _mode(model.device, precision):
            loss = net(b, spec, None, gen).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(batches[0])
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if model.device.type == "cuda" else [])
    t = time.perf_counter()
    with profile(activities=acts) as prof:
        for b in batches[1:]:
            step(b)
    ms = (time.perf_counter() - t) / steps * 1e3
    attr = "self_device_time_total" if model.device.type == "cuda" else "self_cpu_time_total"
    ev = [(e.key, getattr(e, attr)) for e in prof.key_averages()]
    total = sum(t for _, t in ev) or 1.0
    top = sorted(ev, key=lambda x: -x[1])[:10]
    net.eval()
    return {"precision": precision, "ms_per_step": ms, "ops": [(k[:60], t / total) for k, t in top]}


if __name__ == "__main__":
    main()
