"""The benchmark harness and the kd_loss / linear_kd_loss benchmarks in --quick CPU mode.

The benchmarks run in this process (``main(argv)``) at tiny sizes with results written to a
temporary folder; the assertions check that the result files exist and hold measured rows, the
skipped providers with their reasons, and the environment record. Timings themselves are not
asserted (speed claims come from the benchmarks, not from tests).
"""

from __future__ import annotations

import csv
import json
import sys

import pytest
import torch

from benchmarks import _harness, bench_kd_loss, bench_linear_kd_loss


def test_time_ms_quantiles_are_ordered():
    t = _harness.time_ms(lambda: torch.randn(64, 64).sum(), warmup=1, rep=5, device="cpu")
    assert set(t) == {"p50", "p20", "p80"}
    assert 0 < t["p20"] <= t["p50"] <= t["p80"]


def test_time_ms_resets_grads():
    x = torch.randn(8, requires_grad=True)
    seen = []

    def fn():
        seen.append(x.grad is None)
        x.sum().backward()

    _harness.time_ms(fn, warmup=1, rep=2, grad_to_none=[x], device="cpu")
    assert seen == [True, True, True]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="CPU peak memory reads /proc (Linux)")
def test_cpu_peak_extra_bytes_sees_a_torch_allocation():
    size = 64 * 2 ** 20

    def allocate():
        x = torch.ones(size // 4)  # touched: resident
        return float(x[-1])

    measured = _harness.peak_extra_bytes(allocate, "cpu")
    assert 0.8 * size <= measured <= 1.3 * size, measured
    assert _harness.peak_extra_bytes(lambda: None, "cpu") < 0.1 * size


def test_write_results_and_print_table(tmp_path, capsys):
    rows = [dict(provider="a", ms=1.5, dtype=torch.bfloat16), dict(provider="b", status="skipped: x")]
    csv_path, json_path = _harness.write_results("demo", rows, str(tmp_path), device="cpu")
    assert csv_path == str(tmp_path / "demo-cpu.csv") and json_path == str(tmp_path / "demo-cpu.json")
    data = _load(json_path)
    assert data["name"] == "demo" and data["rows"][0]["dtype"] == "bfloat16"
    assert {"device_name", "torch", "triton", "git_commit", "timestamp"} <= set(data["env"])
    with open(csv_path) as f:
        lines = list(csv.DictReader(f))
    assert [r["provider"] for r in lines] == ["a", "b"] and lines[0]["env_torch"] == torch.__version__
    _harness.print_table(rows, ["provider", "ms", "status"])
    out = capsys.readouterr().out
    assert "provider" in out and "1.5" in out and "skipped: x" in out


def _load(json_path):
    with open(json_path) as f:
        return json.load(f)


def test_bench_kd_loss_quick(tmp_path):
    assert bench_kd_loss.main(["--quick", "--device", "cpu", "--out-dir", str(tmp_path)]) == 0
    data = _load(tmp_path / "kd_loss_quick-cpu.json")
    assert (tmp_path / "kd_loss_quick-cpu.csv").exists()
    rows = data["rows"]
    full = {r["provider"]: r for r in rows if r.get("mode") == "full"}
    assert {"eager", "kd_loss[torch]"} <= set(full)
    for row in full.values():
        assert row["ms"] > 0 and row["GB/s"] > 0 and row["peak_MB"] > 0
        assert row["loss_rel_err"] < 1e-5
    skipped = {r["provider"]: r["status"] for r in rows if str(r.get("status", "")).startswith("skipped")}
    assert {"compile", "liger_kl", "liger_jsd"} <= set(skipped)
    target = [r for r in rows if r.get("mode") == "memory_target"]
    assert len(target) == 2 and target[1]["mem_ratio"] > 0


def test_bench_linear_kd_loss_quick(tmp_path):
    assert bench_linear_kd_loss.main(["--quick", "--device", "cpu", "--out-dir", str(tmp_path)]) == 0
    data = _load(tmp_path / "linear_kd_loss_quick-cpu.json")
    assert (tmp_path / "linear_kd_loss_quick-cpu.csv").exists()
    full = {r["provider"]: r for r in data["rows"] if r.get("mode") == "full"}
    assert {"eager", "linear_kd_loss[torch]"} <= set(full)
    for row in full.values():
        assert row["ms"] > 0 and row["TFLOP/s"] > 0 and row["peak_MB"] > 0
        assert row["loss_rel_err"] < 1e-5
    assert any(r["provider"] == "trl_chunked" and r["status"].startswith("skipped") for r in data["rows"])
