"""kd_loss: naive PyTorch, torch.compile, our backends and Liger-Kernel, forward / backward / full.

    python -m benchmarks.bench_kd_loss [--sizes N:V ...] [--providers ...] [--quick] [--device cpu|cuda]

The loss everywhere is forward KL at T=2 with the T² factor, batchmean (what ``kd_loss`` computes
by default at that temperature). Providers:

* ``eager``        the usual way: ``F.kl_div(F.log_softmax(s / T, -1, dtype=float32),
                   F.log_softmax(t / T, -1, dtype=float32), log_target=True, reduction="batchmean") · T²``
* ``compile``      ``torch.compile`` of the same function (skipped by --quick: it compiles for
                   tens of seconds on CPU).
* ``kd_loss[torch|triton|cuda]``  :func:`kdengine.ops.kd_loss` with that backend. The fused
                   backends write the gradient during the forward, so their "forward" includes it.
* ``liger_kl``     ``LigerKLDIVLoss(log_target=True)`` on torch log_softmax outputs, and
  ``liger_jsd``    ``LigerJSD(beta=0.0)`` (forward KL) likewise, when liger_kernel is importable
                   (GPU only). TRL's ``trl.kernels.chunked_divergence`` takes hidden states and
                   lm_head weights, so it is benchmarked in ``bench_linear_kd_loss``.

Modes: ``forward`` (student requires grad, as in training), ``full`` (forward + backward) and
``backward`` = full − forward (p50s of the same run; fused backends cannot re-run a backward).

Columns: ms (p50, p20, p80); ``GB/s`` (full mode) = floor bytes / time, floor = read student and
teacher once and write the student gradient once = 3 · N · V · element size (6 B/element in bf16,
12 in fp32); ``peak_MB`` (full mode) = peak extra memory over the inputs (harness
``peak_extra_bytes``: CUDA allocator peak, CPU resident-set high-water mark); ``speedup`` and
``mem_ratio`` against ``eager`` in the same run; ``loss_rel_err`` = |loss − eager loss| / |eager loss|
(a provider computing something else shows here).

Sizes: GPU N ∈ {4096, 16384} × V ∈ {32000, 128256} bf16. CPU: the torch-based providers at small
fp32 sizes, plus the CPU memory target: the torch backend's peak extra memory for forward +
backward at N=8192, V=32000 fp32 must be ≤ 1/4 of eager's (measured once each, printed as a ratio).
Results: benchmarks/results/kd_loss[_quick]-<device>.{csv,json}.
"""

from __future__ import annotations

import argparse
import importlib
import sys

import torch
import torch.nn.functional as F

from benchmarks._harness import (
    loss_bench_args,
    pct_of_floor,
    peak_extra_bytes,
    print_table,
    run_providers,
    time_ms,
    write_results,
)
from kdengine.ops import _backends
from kdengine.ops.kd_loss import kd_loss

TEMPERATURE = 2.0
MEMORY_TARGET = dict(n=8192, v=32000, ratio=0.25)
SIZES = {
    "cuda": [(n, v) for n in (4096, 16384) for v in (32000, 128256)],
    "cuda-quick": [(1024, 32000)],
    "cpu": [(512, 32000), (64, 128256)],
    "cpu-quick": [(32, 2000)],
}
PROVIDERS = ("eager", "compile", "kd_loss[torch]", "kd_loss[triton]", "kd_loss[cuda]", "liger_kl",
             "liger_jsd")
COLUMNS = ["provider", "mode", "N", "V", "dtype", "ms", "ms_p20", "ms_p80", "GB/s", "pct_floor", "speedup",
           "peak_MB", "mem_ratio", "loss_rel_err", "grad_err", "status"]
GRAD_CHECK_ROWS = 64  # rows whose gradient is compared with float64 eager


def eager_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Forward KL at TEMPERATURE the usual PyTorch way (fp32 log-softmax on both sides)."""
    log_q = F.log_softmax(student / TEMPERATURE, dim=-1, dtype=torch.float32)
    log_p = F.log_softmax(teacher / TEMPERATURE, dim=-1, dtype=torch.float32)
    return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean") * TEMPERATURE ** 2


def _liger(kind: str):
    """Liger loss callable on logits, or the reason it cannot run."""
    try:
        if kind == "liger_kl":
            module = importlib.import_module("liger_kernel.transformers.kl_div")
            fn = module.LigerKLDIVLoss(reduction="batchmean", log_target=True)
        else:
            module = importlib.import_module("liger_kernel.transformers.jsd")
            fn = module.LigerJSD(beta=0.0)
    except (ImportError, AttributeError) as exc:
        return None, f"liger_kernel not importable ({exc})"

    def loss(student, teacher):
        log_q = F.log_softmax(student / TEMPERATURE, dim=-1, dtype=torch.float32)
        log_p = F.log_softmax(teacher / TEMPERATURE, dim=-1, dtype=torch.float32)
        return fn(log_q, log_p) * TEMPERATURE ** 2

    return loss, None


def provider_fn(name: str, device: str, quick: bool):
    """(loss(student, teacher) -> scalar, None) or (None, reason it is skipped)."""
    if name == "eager":
        return eager_kl, None
    if name == "compile":
        if quick:
            return None, "--quick skips torch.compile (compilation takes tens of seconds on CPU)"
        return torch.compile(eager_kl, dynamic=False), None
    if name.startswith("kd_loss["):
        backend = name[len("kd_loss["):-1]
        ok, why = _backends.availability(backend)
        if not ok:
            return None, why
        if backend == "triton" and _backends.triton_interpreter():
            return None, "the Triton interpreter (TRITON_INTERPRET=1) is not timed"
        if backend != "torch" and device != "cuda":
            return None, f"the {backend} backend needs CUDA tensors"
        return (lambda s, t: kd_loss(s, t, temperature=TEMPERATURE, backend=backend)), None
    if name in ("liger_kl", "liger_jsd"):
        if device != "cuda":
            return None, "Liger kernels are Triton GPU kernels"
        return _liger(name)
    raise ValueError(f"unknown provider {name!r}; expected one of {PROVIDERS}")


def make_inputs(n: int, v: int, dtype, device):
    gen = torch.Generator(device=device).manual_seed(0)  # generated on the device: no host copy
    student = (torch.randn(n, v, generator=gen, device=device) * 3).to(dtype).requires_grad_()
    teacher = (torch.randn(n, v, generator=gen, device=device) * 3).to(dtype)
    return student, teacher


def full_step(loss_fn, student, teacher):
    """Forward + backward; the gradient is dropped at the end (so peak memory includes it once)."""
    def run():
        loss_fn(student, teacher).backward()
        student.grad = None
    return run


def measure(name, loss_fn, n, v, dtype, device, reps, memory: bool) -> list[dict]:
    """Rows for the forward, backward and full modes of one provider at one size."""
    student, teacher = make_inputs(n, v, dtype, device)
    base = dict(provider=name, N=n, V=v, dtype=str(dtype).replace("torch.", ""))
    warmup, rep = reps
    try:
        with torch.no_grad():
            loss_value = loss_fn(student.detach(), teacher).item()
        fwd = time_ms(lambda: loss_fn(student, teacher), warmup=warmup, rep=rep, device=device)
        full = time_ms(full_step(loss_fn, student, teacher), warmup=warmup, rep=rep, grad_to_none=[student],
                       device=device)
        peak = peak_extra_bytes(full_step(loss_fn, student, teacher), device, warmup=0) if memory else None
    except torch.OutOfMemoryError:
        return [dict(base, mode=mode, status="OOM") for mode in ("forward", "backward", "full")]
    floor_bytes = 3 * n * v * student.element_size()
    gbps = floor_bytes / (full["p50"] * 1e-3) / 1e9
    rows = [
        dict(base, mode="forward", ms=fwd["p50"], ms_p20=fwd["p20"], ms_p80=fwd["p80"], status="ok"),
        dict(base, mode="backward", ms=full["p50"] - fwd["p50"], status="ok (full - forward)"),
        dict(base, mode="full", ms=full["p50"], ms_p20=full["p20"], ms_p80=full["p80"],
             **{"GB/s": gbps}, pct_floor=pct_of_floor(gbps, device),
             peak_MB=None if peak is None else peak / 2 ** 20, grad_err=grad_error(loss_fn, student, teacher),
             status="ok"),
    ]
    for row in rows:
        row["loss"] = loss_value
    return rows


def grad_error(loss_fn, student, teacher) -> float:
    """max |dL/ds − float64 truth| / max |truth| on the first GRAD_CHECK_ROWS rows."""
    s = student.detach()[:GRAD_CHECK_ROWS].clone().requires_grad_()
    t = teacher[:GRAD_CHECK_ROWS]
    loss_fn(s, t).backward()
    s64 = s.detach().double().requires_grad_()
    eager_kl(s64, t.double()).backward()
    return ((s.grad.double() - s64.grad).abs().max() / s64.grad.abs().max()).item()


def add_ratios(rows: list[dict]) -> None:
    """speedup, mem_ratio and loss_rel_err against eager at the same size (N, H, Ht, V) and mode."""
    def key(row):
        return tuple(row.get(k) for k in ("N", "H", "Ht", "V", "mode"))

    eager = {key(r): r for r in rows if r["provider"] == "eager" and "ms" in r}
    for row in rows:
        ref = eager.get(key(row))
        if ref is None or "ms" not in row:
            continue
        if row["ms"] > 0 and ref["ms"] > 0:
            row["speedup"] = ref["ms"] / row["ms"]
        if row.get("peak_MB") and ref.get("peak_MB"):
            row["mem_ratio"] = row["peak_MB"] / ref["peak_MB"]
        row["loss_rel_err"] = abs(row["loss"] - ref["loss"]) / max(abs(ref["loss"]), 1e-30)


def memory_target(n: int, v: int, device: str, quick: bool) -> list[dict]:
    """Peak extra memory of eager vs kd_loss[torch], forward + backward, fp32 (one call each).

    Each provider first runs once on 64 rows, so that code pages and lazily initialised state
    (resident memory too) are in place before the measured call.
    """
    small = make_inputs(64, v, torch.float32, device)
    student, teacher = make_inputs(n, v, torch.float32, device)
    rows = []
    for name, fn in (("eager", eager_kl), ("kd_loss[torch]", provider_fn("kd_loss[torch]", device, True)[0])):
        full_step(fn, *small)()
        peak = peak_extra_bytes(full_step(fn, student, teacher), device, warmup=0)
        rows.append(dict(provider=name, mode="memory_target", N=n, V=v, dtype="float32",
                         peak_MB=peak / 2 ** 20))
    ratio = rows[1]["peak_MB"] / rows[0]["peak_MB"]
    rows[1]["mem_ratio"] = ratio
    if quick:
        target = f"N={MEMORY_TARGET['n']}, V={MEMORY_TARGET['v']}"
        rows[1]["status"] = f"n/a: --quick size (the target is {target})"
    else:
        verdict = "PASS" if ratio <= MEMORY_TARGET["ratio"] else "FAIL"
        rows[1]["status"] = f"{verdict} (target <= {MEMORY_TARGET['ratio']})"
    return rows


def parse_size(text: str) -> tuple[int, int]:
    try:
        n, v = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be N:V (e.g. 4096:32000), got {text!r}") from None
    if n < 1 or v < 1:
        raise argparse.ArgumentTypeError(f"N and V must be positive, got {text!r}")
    return n, v


def main(argv=None) -> int:
    args = loss_bench_args(__doc__, parse_size, "N:V pairs", PROVIDERS, argv)
    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    sizes = args.sizes or SIZES[device + ("-quick" if args.quick else "")]
    reps = (None, None) if device == "cuda" else ((1, 2) if args.quick else (1, 3))
    rows, skipped = run_providers("kd_loss", args.providers, provider_fn, sizes,
                                  lambda name, fn, size: measure(name, fn, *size, dtype, device, reps, memory=True), device, args.quick)
    add_ratios(rows)
    print_table(rows, COLUMNS, title=f"kd_loss, forward KL T={TEMPERATURE}, {device}")
    for row in skipped:
        print(f"  {row['provider']}: {row['status']}")

    if device == "cpu":
        n, v = (512, 4000) if args.quick else (MEMORY_TARGET["n"], MEMORY_TARGET["v"])
        target = memory_target(n, v, device, args.quick)
        print_table(target, ["provider", "mode", "N", "V", "dtype", "peak_MB", "mem_ratio", "status"],
                    title=f"\nCPU memory target: kd_loss[torch] peak extra memory (fwd+bwd) <= "
                          f"{MEMORY_TARGET['ratio']} x eager" + (" [--quick size]" if args.quick else ""))
        rows += target
    csv_path, json_path = write_results("kd_loss" + ("_quick" if args.quick else ""), rows + skipped,
                                        args.out_dir, device=device)
    print(f"results: {csv_path} {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
