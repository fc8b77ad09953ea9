"""benchmarks/profile_step.py: the CPU smoke run (--tiny) and its op categorisation."""

from __future__ import annotations

import json

import pytest

from bench_scripts import load_bench_script

pytest.importorskip("diffusers")  # bench_sana (imported by the script) builds diffusers' models


def _script():
    return load_bench_script("profile_step")  # it imports its siblings _common and bench_sana


def test_tiny_profile_of_both_impls_writes_tables(tmp_path, capsys):
    script = _script()
    out = tmp_path / "prof.json"
    assert script.main(["--tiny", "--steps", "1", "--warmup", "1", "--top", "5", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert set(data["impls"]) == {"ours", "diffusers"}
    assert data["cosine_ours_vs_diffusers"] > 0.9999  # same weights, fp32
    for report in data["impls"].values():
        assert report["total_ms"] > 0
        assert 0 < report["host_ms"] <= report["wall_ms"]  # on the CPU the calls are the work: equal-ish
        assert 0 < len(report["ops"]) <= 5
        cats = {c["category"] for c in report["categories"]}
        assert {"gemm", "conv"} <= cats
        assert abs(sum(c["pct"] for c in report["categories"]) - 100) < 1e-6
    printed = capsys.readouterr().out
    assert "=== ours:" in printed and "=== diffusers:" in printed and "category" in printed


def test_categories_and_byte_estimates():
    script = _script()
    assert script.categorize("aten::addmm") == "gemm"
    assert script.categorize("aten::cudnn_convolution") == "conv"
    assert script.categorize("aten::addcmul") == "elementwise"
    assert script.categorize("aten::copy_") == "copy/layout"
    assert script.categorize("aten::_efficient_attention_forward") == "attention"
    assert script.categorize("aten::native_layer_norm") == "norm"
    # addmm(bias (N,), a (M, K), b (K, N)): reads N + M*K + K*N, writes M*N, at 2 bytes each
    assert script.bytes_per_call("aten::addmm", [[6], [4, 5], [5, 6]], 2) == (6 + 20 + 30 + 24) * 2
    # a 3x3 depthwise conv (B, C, H, W) with weight (C, 1, 3, 3): output (B, C, H, W)
    assert script.bytes_per_call("aten::cudnn_convolution", [[2, 8, 4, 4], [8, 1, 3, 3]], 4) == (
        (256 + 72 + 256) * 4
    )
    assert script.bytes_per_call("aten::add", [[2, 3], [2, 3], []], 4) == 18 * 4


def test_bad_px_is_refused():
    script = _script()
    with pytest.raises(SystemExit):
        script.parse_args(["--tiny", "--px", "100"])


def test_step_benchmark_smoke_with_regional_and_graph_impls(tmp_path):
    bench = load_bench_script("bench_sana")
    out = tmp_path / "speed.json"
    impls = "diffusers,ours,ours-compile,ours-compile-regional,diffusers-compile-regional,ours-cudagraphs"
    assert bench.main(["--smoke", "--device", "cpu", "--cases", "transformer_step", "--impls", impls,
                       "--out", str(out), "--fresh"]) == 0
    records = {(r["impl"], r["px"]): r for r in json.loads(out.read_text())}
    for impl in ("diffusers", "ours", "ours-compile", "ours-compile-regional", "diffusers-compile-regional"):
        for px in (64, 128):
            r = records[(impl, px)]
            assert r["error"] is None and r["seconds"] > 0, r
            assert "first_call_s=" in r["notes"]
            if impl != "diffusers":
                cos = float(r["notes"].split("cosine_vs_diffusers=")[1].split()[0])
                assert cos > 0.9999, r  # same weights, fp32, any compile flavour
    # the eager pair is timed together, each record naming the other
    assert "interleaved_with=ours" in records[("diffusers", 64)]["notes"]
    assert "interleaved_with=diffusers" in records[("ours", 64)]["notes"]
    assert "interleaved" not in records[("ours-compile", 64)]["notes"]
    # regional compilation: one graph serves every block (a recompile per block would count more)
    assert "compiled_graphs=1" in records[("ours-compile-regional", 64)]["notes"]
    # CUDA graphs need a GPU: recorded as an error, the run goes on
    assert records[("ours-cudagraphs", 64)]["error"] is not None


def test_interleaved_timing_alternates_the_order_and_splits_the_runs():
    bench = load_bench_script("bench_sana")
    settings = bench.settings_from_args(bench.parse_args(["--device", "cpu", "--repeats", "10", "--interleave", "3"]))
    settings.warmup_runs, settings.warmup_s = 1, 0.0
    log = []
    fns = {"a": lambda: log.append("a"), "b": lambda: log.append("b")}
    results = bench.measure_interleaved(fns, settings, settings.interleave)
    # one warm-up each, then 3 rounds of ceil(10 / 3) = 4 runs each, the order flipping every round
    assert log == ["a", "b"] + ["a"] * 4 + ["b"] * 4 + ["b"] * 4 + ["a"] * 4 + ["a"] * 4 + ["b"] * 4
    assert set(results) == {"a", "b"}
    assert all(r["seconds_min"] <= r["seconds"] for r in results.values())
    with pytest.raises(SystemExit):
        bench.settings_from_args(bench.parse_args(["--device", "cpu", "--interleave", "-1"]))


def test_warm_up_waits_for_three_windows_that_agree():
    bench = load_bench_script("bench_sana")
    assert not bench.steady([1.0, 1.0])  # too few windows
    assert bench.steady([2.0, 1.0, 1.01, 1.02])  # the slow first window has dropped out
    assert not bench.steady([1.0, 1.0, 1.1])  # 10 % apart
    assert bench.steady([1.0, 1.1, 1.0], tolerance=0.2)
