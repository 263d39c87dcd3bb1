"""fused_experts_kd_loss: unfused PyTorch composition vs the torch / triton / cuda backends.

    python -m benchmarks.bench_fuse_experts [--quick] [--device cpu|cuda]

Every row is forward + backward to the student (the teacher experts under no_grad), entropy
weighting, logit and prob space, forward KL at T=2.

Providers:

* ``unfused``  the composition written out in PyTorch on fp32 copies of the inputs:
  :func:`kdengine.reference.fuse_experts.fused_experts_kd_loss_reference` (K softmaxes and
  entropies, the weighted sum, then :func:`kdengine.reference.kd_loss.kd_loss_reference`).
* ``torch`` / ``triton`` / ``cuda``  :func:`kdengine.ops.fused_experts_kd_loss` with that backend
  (a backend that cannot run here is listed with its reason and skipped; the Triton interpreter is
  never timed).

Columns: ms (p50, with p20/p80), ``GB/s`` against the one-read floor (every expert and the student
read once, the student gradient written once: (K + 2) · N · V · element size bytes), ``speedup``
= unfused ms / ms (same run), ``peak MB`` = extra memory at the peak over the inputs, and
``mem ratio`` = peak / unfused peak.

CPU (default without a GPU): the memory target of the torch backend, peak ≤ 1/4 of the unfused
composition at K=4, N=2048, V=32000 fp32 (measured once), and small timings. GPU: K=8, V=128256
bf16 at N=4096 and N=16384 (the unfused composition runs out of memory at N=16384: reported as OOM).
"""

from __future__ import annotations

import argparse

import torch

from benchmarks._harness import ResultRows, peak_extra_bytes, print_table, time_ms, write_results
from kdengine.ops import _backends
from kdengine.ops.fuse_experts import fused_experts_kd_loss
from kdengine.reference.fuse_experts import fused_experts_kd_loss_reference

TEMPERATURE = 2.0
# (K, N, V, dtype, measure memory, time it)
SIZES = {
    "cpu": [(4, 2048, 32000, torch.float32, True, False), (4, 128, 32000, torch.float32, False, True)],
    "cpu-quick": [(4, 256, 32000, torch.float32, True, False), (4, 64, 8000, torch.float32, False, True)],
    "cuda": [(8, 4096, 128256, torch.bfloat16, True, True), (8, 16384, 128256, torch.bfloat16, True, True)],
    "cuda-quick": [(8, 2048, 32000, torch.bfloat16, True, True)],
}
BACKENDS = ("torch", "triton", "cuda")


def make_inputs(k, n, v, dtype, device):
    gen = torch.Generator(device=device).manual_seed(0)  # generated on the device: no host copy
    experts = torch.empty(k, n, v, dtype=dtype, device=device)
    for e in range(k):  # one expert at a time: no [K, N, V] fp32 temporary while building
        experts[e] = (torch.randn(n, v, generator=gen, device=device) * (1.0 + e)).to(dtype)
    student = torch.randn(n, v, generator=gen, device=device).to(dtype)
    return student, experts


def step(provider, student, experts, space):
    """One forward + backward to the student; returns the callable the harness runs."""
    def unfused():
        s = student.detach().float().requires_grad_(True)
        loss = fused_experts_kd_loss_reference(s, experts.float(), weighting="entropy", space=space,
                                               temperature=TEMPERATURE)
        loss.backward()

    def fused():
        s = student.detach().requires_grad_(True)
        loss = fused_experts_kd_loss(s, experts, weighting="entropy", space=space, temperature=TEMPERATURE,
                                     backend=provider)
        loss.backward()

    return unfused if provider == "unfused" else fused


def runnable(provider, student, experts) -> str | None:
    """None when ``provider`` can run these inputs for timing, else the reason."""
    if provider == "unfused":
        return None
    if provider == "triton" and _backends.triton_interpreter():
        return "Triton interpreter (TRITON_INTERPRET=1) is not timed"
    ok, why = _backends.availability(provider)
    if not ok:
        return why
    if provider != "torch" and student.device.type != "cuda":
        return "needs CUDA tensors"
    return None


def measure(fn, device, *, memory: bool, timing: bool, quick: bool) -> dict:
    out = {}
    try:
        if memory:
            out["peak_mb"] = peak_extra_bytes(fn, device) / 2**20
        if timing:
            t = time_ms(fn, warmup=1 if quick else 3, rep=3 if quick else 10)
            out.update(ms=t["p50"], ms_p20=t["p20"], ms_p80=t["p80"])
    except torch.OutOfMemoryError:
        out["status"] = "OOM"
    return out


def run(device: str, quick: bool) -> list[dict]:
    rows = ResultRows("fuse_experts")
    for k, n, v, dtype, memory, timing in SIZES[device + ("-quick" if quick else "")]:
        student, experts = make_inputs(k, n, v, dtype, device)
        floor_bytes = (k + 2) * n * v * student.element_size()
        for space in ("logit", "prob"):
            base = None
            for provider in ("unfused", *BACKENDS):
                row = dict(provider=provider, space=space, K=k, N=n, V=v,
                           dtype=str(dtype).replace("torch.", ""))
                reason = runnable(provider, student, experts)
                if reason is not None:
                    rows.append({**row, "status": f"skipped: {reason.split(' (')[0]}"})
                    continue
                row.update(measure(step(provider, student, experts, space), device, memory=memory,
                                   timing=timing, quick=quick))
                if "ms" in row:
                    row["GB/s"] = floor_bytes / (row["ms"] * 1e-3) / 1e9
                if provider == "unfused":
                    base = row
                elif base is not None:
                    if "ms" in row and "ms" in base:
                        row["speedup"] = base["ms"] / row["ms"]
                    if "peak_mb" in row and "peak_mb" in base:
                        row["mem_ratio"] = row["peak_mb"] / base["peak_mb"]
                rows.append(row)
                if device == "cuda":
                    torch.cuda.empty_cache()
        del student, experts
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, few repetitions")
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out-dir", default="benchmarks/results")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    rows = run(args.device, args.quick)
    print_table(rows, ["provider", "space", "K", "N", "V", "dtype", "ms", "ms_p20", "ms_p80", "GB/s",
                       "speedup", "peak_mb", "mem_ratio", "status"])
    csv_path, json_path = write_results("fuse_experts" + ("_quick" if args.quick else ""), rows, args.out_dir,
                                        device=args.device)
    print(f"results: {csv_path} {json_path}")


if __name__ == "__main__":
    main()
