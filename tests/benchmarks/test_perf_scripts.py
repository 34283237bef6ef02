"""The performance scripts run and measure what they claim: the naive reference and ours compute
the same embeddings, FLOPs are counted, the paper-sized model builds from configs. No timing is
asserted (figures live in benchmarks/results/)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.conftest import PBMC3K

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def perf():
    sys.path.insert(0, str(BENCH))
    import perf

    yield perf
    sys.path.remove(str(BENCH))


def _small(tmp_path, *extra) -> list[str]:
    return ["--data", str(PBMC3K), "--out", str(tmp_path / "perf.json"),
            "--max-genes", "48", "--cells", "24", "--steps", "1", "--batch-size", "4", "--describe-cells", "2",
            "--new-tokens", "3", *extra]


@pytest.mark.slow  # times every path, profiles and measures the matmul peak (~4 min on 2 cores): a benchmark
def test_naive_reference_matches_ours_and_flops_are_counted(perf, tmp_path):
    rec = perf.main(_small(tmp_path))
    assert json.loads((tmp_path / "perf.json").read_text()) == json.loads(json.dumps(rec))
    (row,) = rec["results"]
    # padding every cell to max_genes and file order change the speed, not the result; bf16 the last bits
    assert row["embed_max_abs_diff"] < 1e-4
    assert row["embed_bf16_min_cosine"] > 0.999
    # the library's matching path and BLIP-2's per-pair computation (the naive column's) agree
    assert row["match_max_abs_diff"] < 1e-4
    for key in ("embed_cells_per_s", "stage1_cells_per_s", "stage2_cells_per_s", "describe_tokens_per_s"):
        v = row[key]
        assert min(v["naive"], v["fp32"], v["bf16"]) > 0
        assert v["ratio_fp32"] == pytest.approx(v["fp32"] / v["naive"])
        assert v["ratio_bf16"] == pytest.approx(v["bf16"] / v["naive"])
    assert row["generate_cells_per_s"]["bf16"] > 0
    # stage 2 runs the LM over the description as well: more FLOPs per cell than stage 1
    for v in ("fp32", "bf16"):
        f1, f2 = row["stage1_flops"][v], row["stage2_flops"][v]
        assert f2["model_flops"] > f1["model_flops"] > 1e9
        assert f1["mfu"] is None                    # no data-sheet peak on CPU
        assert 0 < f1["share_of_measured_peak"] == pytest.approx(f1["flops_per_s"] / rec["matmul_peak_flops"][v])
    # the same FLOPs whatever the precision (autocast changes dtypes, not work)
    assert row["stage1_flops"]["bf16"]["model_flops"] == pytest.approx(row["stage1_flops"]["fp32"]["model_flops"],
                                                                       rel=0.01)
    # bf16 is measured, not assumed: a CPU without AMX/AVX512-BF16 emulates it at ~1 GFLOP/s
    assert rec["matmul_peak_flops"]["fp32"] > 1e9 and rec["matmul_peak_flops"]["bf16"] > 0
    assert rec["profile_stage1"]["ops"] and rec["profile_stage1"]["ms_per_step"] > 0
    lines = perf.table_lines(rec)
    assert any("ours-bf16" in line for line in lines) and any("share of measured peak" in line for line in lines)
    assert rec["machine"]["git_commit"] and rec["device"] == "cpu"


def test_pad_to_pads_with_masked_positions(perf):
    import torch

    from scmmgpt.data.dataset import CellBatch

    b = CellBatch(gene_ids=torch.tensor([[1, 5, 6]]), values=torch.tensor([[0.0, 1.0, 2.0]]),
                  padding_mask=torch.tensor([[False, False, False]]), index=torch.tensor([0]))
    p = perf.pad_to(b, 6, pad_id=0, pad_value=-2.0)
    assert p.gene_ids.tolist() == [[1, 5, 6, 0, 0, 0]] and p.values[0, 3:].tolist() == [-2.0] * 3
    assert p.padding_mask.tolist() == [[False] * 3 + [True] * 3]


@pytest.mark.slow  # builds a 12 x 512 encoder, a BERT-base layer and a 2048-wide Llama layer (~1 min)
def test_paper_sized_model_builds_from_configs(perf, tmp_path):
    rec = perf.main(_small(tmp_path, "--model", "paper", "--assets-dir", str(tmp_path / "assets"),
                           "--lm-layers", "1", "--bert-layers", "1"))
    sizes = rec["parameters"]
    n_genes = rec["results"][0]["vocab_size"]
    # 12 layers of 1.58M parameters at width 512 (+ the 0.27M value encoder), one 512-wide embedding per gene
    assert sizes["cell_encoder"] - 512 * n_genes == pytest.approx(12 * 1_577_984, rel=0.02)
    assert sizes["lm"] > 200e6                        # one 2048-wide layer + 49k x 2048 embeddings and head
    assert rec["results"][0]["embed_max_abs_diff"] < 1e-3


def test_cpu_attention_flops_are_counted(perf):
    """torch's counter has no formula for the CPU flash kernel; perf registers torch's SDPA one."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    q = torch.randn(2, 4, 128, 32)
    with FlopCounterMode(display=False) as counter:
        F.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(2, 1, 1, 128, dtype=torch.bool))
    assert counter.get_total_flops() == 2 * (2 * 2 * 4 * 128 * 128 * 32)      # QK^T and AV


def test_precisions_must_keep_the_fp32_column(perf, tmp_path, capsys):
    """The agreement checks compare against fp32; a run without it is refused before any work."""
    with pytest.raises(SystemExit):
        perf.main(_small(tmp_path, "--precisions", "bf16"))
    assert "--precisions must include fp32" in capsys.readouterr().err
