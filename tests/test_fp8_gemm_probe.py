"""benchmarks/fp8_gemm_probe.py: refuses machines without fp8 tensor cores; on one, writes its records."""

from __future__ import annotations

import json

import pytest
import torch

from bench_scripts import load_bench_script


def _has_fp8() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


@pytest.mark.skipif(_has_fp8(), reason="checks the refusal on machines without fp8 tensor cores")
def test_refuses_without_fp8_gpu(tmp_path, capsys):
    out = tmp_path / "probe.json"
    assert load_bench_script("fp8_gemm_probe").main(["--out", str(out)]) == 2
    assert "compute capability" in capsys.readouterr().err
    assert not out.exists()


def test_shape_table_matches_the_official_blocks():
    script = load_bench_script("fp8_gemm_probe")
    from _common import SANA_600M

    hidden = SANA_600M["num_attention_heads"] * SANA_600M["attention_head_dim"]  # 1152
    ffn = int(hidden * SANA_600M["mlp_ratio"])  # 2880
    assert {(k, n) for _, k, n in script.SHAPES["600M"]} == {
        (hidden, 3 * hidden), (hidden, hidden), (hidden, 2 * ffn), (ffn, hidden)}
    assert {(k, n) for _, k, n in script.SHAPES["1600M"]} == {(2240, 6720), (2240, 2240), (2240, 11200), (5600, 2240)}


@pytest.mark.gpu
@pytest.mark.skipif(not _has_fp8(), reason="needs a CUDA GPU with fp8 tensor cores")
def test_probe_writes_records_and_block_sums(tmp_path):
    out = tmp_path / "probe.json"
    assert load_bench_script("fp8_gemm_probe").main(["--px", "512", "--runs", "2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert len(report["records"]) == 8 and len(report["block_summary"]) == 2
    assert all(r["bf16_ms"] > 0 and r["fp8_row_fast_ms"] > 0 for r in report["records"])
