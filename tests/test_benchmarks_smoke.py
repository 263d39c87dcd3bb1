"""The benchmark harness, the kd_loss / linear_kd_loss / runtime / PromptKD-step benchmarks in --quick CPU
mode, and the GPU session script in --dry-run mode.

The benchmarks run in this process (``main(argv)``) at tiny sizes with results written to a
temporary folder; the assertions check that the result files exist and hold measured rows, the
skipped providers with their reasons, and the environment record. Timings themselves are not
asserted (speed claims come from the benchmarks, not from tests).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from benchmarks import _harness, bench_kd_loss, bench_linear_kd_loss, bench_prompt_kd_step, bench_runtime


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


def test_bench_runtime_quick(tmp_path):
    """A tiny PEE-KD run (K=4) through ExpertRuntime: one row per routing with its throughput, accuracy
    and ratio to the ensemble, the ensemble's own ratio 1, and the target row."""
    assert bench_runtime.main(["--quick", "--device", "cpu", "--out-dir", str(tmp_path)]) == 0
    assert (tmp_path / "runtime_quick-cpu.csv").exists()
    rows = {r["routing"]: r for r in _load(tmp_path / "runtime_quick-cpu.json")["rows"]}
    measured = {f"expert_{i}" for i in range(4)} | {"all", "selector_top1", "selector_top2", "oracle_top1"}
    assert set(rows) == measured | {"target"}
    for name in measured:
        assert rows[name]["examples_per_s"] > 0 and 0.0 <= rows[name]["accuracy"] <= 1.0
        assert rows[name]["examples"] == 32
    assert rows["all"]["speedup_vs_all"] == 1.0 and rows["all"]["experts_per_input"] == 4
    assert rows["selector_top2"]["experts_per_input"] == 2 and rows["oracle_top1"]["experts_per_input"] == 1
    assert rows["oracle_top1"]["accuracy"] >= max(rows[f"expert_{i}"]["accuracy"] for i in range(4))
    assert rows["target"]["speedup_target"] == pytest.approx(3.6)


def test_bench_prompt_kd_step_quick(tmp_path):
    """Every variant in its own process at a tiny size: the three phases, the peak and the first-step
    losses (unfused = fused: the same step), TRL measured or skipped with its reason, the target row."""
    assert bench_prompt_kd_step.main(["--quick", "--device", "cpu", "--out-dir", str(tmp_path)]) == 0
    assert (tmp_path / "prompt_kd_step_quick-cpu.csv").exists()
    rows = {r["variant"]: r for r in _load(tmp_path / "prompt_kd_step_quick-cpu.json")["rows"]}
    assert set(rows) == {"fused", "unfused", "fused_no_prompt", "trl_gkd", "target"}
    for name in ("fused", "unfused"):
        row = rows[name]
        assert row["sampling_ms"] > 0 and row["prompt_update_ms"] > 0 and row["student_update_ms"] > 0
        assert row["step_ms"] > 0 and row["peak_MB"] > 0 and row["response_tokens"] > 0
    assert rows["fused_no_prompt"]["prompt_update_ms"] is None
    assert rows["unfused"]["loss_rel_err"] < 1e-4
    assert rows["unfused"]["first_teacher_loss"] == pytest.approx(rows["fused"]["first_teacher_loss"], rel=1e-4)
    trl = rows["trl_gkd"]
    assert "step_ms" in trl or trl["status"].startswith("skipped: trl is not importable")
    assert rows["target"]["peak_ratio_fused_vs_unfused"] > 0


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                    reason="benchmarks/gpu_session.sh needs bash and coreutils' timeout")
def test_gpu_session_dry_run(tmp_path):
    """bash benchmarks/gpu_session.sh --dry-run runs every step of the GPU session on CPU at tiny sizes:
    rows are streamed to rows.jsonl as measured, every benchmark leaves its result files under $OUT
    (never under benchmarks/results), and the traffic table is printed."""
    out = tmp_path / "session"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    before = sorted(os.listdir(_harness.REPO_ROOT + "/benchmarks/results"))
    done = subprocess.run(["bash", "benchmarks/gpu_session.sh", "--dry-run"], cwd=_harness.REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=1200, check=False)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert "all steps passed" in (out / "summary.txt").read_text()
    with open(out / "rows.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert {"kd_loss", "linear_kd_loss", "fuse_experts", "expert_forward", "train_step", "runtime",
            "prompt_kd_step"} <= {r["bench"] for r in rows}
    full = [r for r in rows if r["bench"] == "kd_loss" and r.get("mode") == "full"]
    assert full and {"ms", "GB/s", "pct_floor", "peak_MB", "grad_err"} <= set(full[0])
    assert all(r["grad_err"] < 1e-4 for r in full)
    for name in ("kd_loss_quick", "linear_kd_loss_quick", "fuse_experts_quick", "expert_forward_quick",
                 "train_step-tiny", "runtime_quick", "prompt_kd_step_quick"):
        assert (out / "results" / f"{name}-cpu.json").exists(), name
    assert "| kd_loss | forward_kl | bfloat16 |" in (out / "logs" / "traffic.log").read_text()
    assert sorted(os.listdir(_harness.REPO_ROOT + "/benchmarks/results")) == before
