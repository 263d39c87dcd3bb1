"""linear_kd_loss: LM heads fused with the loss vs materialised logits, forward / backward / full.

    python -m benchmarks.bench_linear_kd_loss [--sizes N:H:Ht:V ...] [--providers ...] [--quick]
                                             [--device cpu|cuda]

The student head (hidden [N, H], weight [V, H]) gets gradients; the teacher head (hidden [N, Ht],
weight [V, Ht]) is frozen. Loss: forward KL at T=2 with T², batchmean. Providers:

* ``eager``     logits = hidden @ weightᵀ for both models (teacher under no_grad), then the
                ``eager`` loss of bench_kd_loss (fp32 log-softmax + kl_div): the usual way,
                two [N, V] logits plus their fp32 log-softmaxes and gradients.
* ``compile``   ``torch.compile`` of the same (skipped by --quick).
* ``linear_kd_loss[torch|triton|cuda]``  :func:`kdengine.ops.linear_kd_loss` (teacher_hidden +
                teacher_weight) with that backend's rows primitive; chunked, gradients in forward.
* ``trl_chunked``  ``trl.kernels.chunked_divergence.ChunkedDivergenceFunction`` (beta=0: forward
                KL; its per-token divergence · T², mean) when trl is importable (GPU only).
* ``liger_fljsd``  Liger's ``LigerFusedLinearJSD(jsd_beta=0, temperature=T)`` (β=0: forward KL,
                batchmean; · T²) when liger_kernel is importable (GPU only).

Modes: ``forward`` (student requires grad), ``full`` (forward + backward), ``backward`` =
full − forward. Columns: ms (p50, p20, p80); ``TFLOP/s`` (full mode) against the GEMM work
2 · N · V · (3 · H + Ht) (student logits, dh, dW, teacher logits); ``peak_MB`` (full mode,
harness ``peak_extra_bytes``); ``speedup`` / ``mem_ratio`` against eager in the same run;
``loss_rel_err`` against eager's loss. Results: benchmarks/results/linear_kd_loss[_quick]-<device>.{csv,json}.
"""

from __future__ import annotations

import argparse
import importlib
import sys

import torch

from benchmarks._harness import (
    loss_bench_args,
    peak_extra_bytes,
    print_table,
    run_providers,
    time_ms,
    write_results,
)
from benchmarks.bench_kd_loss import TEMPERATURE, add_ratios, eager_kl
from kdengine.ops import _backends
from kdengine.ops.linear_kd_loss import linear_kd_loss

SIZES = {
    "cuda": [(n, 2048, 4096, v) for n in (4096, 16384) for v in (32000, 128256)],
    "cuda-quick": [(1024, 1024, 2048, 32000)],
    "cpu": [(1024, 256, 384, 32000)],
    "cpu-quick": [(48, 32, 48, 1000)],
}
PROVIDERS = ("eager", "compile", "linear_kd_loss[torch]", "linear_kd_loss[triton]", "linear_kd_loss[cuda]",
             "trl_chunked", "liger_fljsd")
COLUMNS = ["provider", "mode", "N", "H", "Ht", "V", "dtype", "ms", "ms_p20", "ms_p80", "TFLOP/s", "speedup",
           "peak_MB", "mem_ratio", "loss_rel_err", "status"]


def eager_linear(hidden, weight, t_hidden, t_weight):
    """Materialised logits, then the eager loss."""
    with torch.no_grad():
        teacher = t_hidden @ t_weight.t()
    return eager_kl(hidden @ weight.t(), teacher)


def _trl():
    try:
        module = importlib.import_module("trl.kernels.chunked_divergence")
        fn = module.ChunkedDivergenceFunction
    except (ImportError, AttributeError) as exc:
        return None, f"trl.kernels.chunked_divergence not importable ({exc})"

    def loss(hidden, weight, t_hidden, t_weight):
        divergence, _ = fn.apply(hidden, weight, None, t_hidden, t_weight, None, 0.0, TEMPERATURE)
        return divergence.mean() * TEMPERATURE ** 2

    return loss, None


def _liger_fljsd():
    try:
        module = importlib.import_module("liger_kernel.transformers.fused_linear_jsd")
        fn = module.LigerFusedLinearJSD(jsd_beta=0.0, temperature=TEMPERATURE)
    except (ImportError, AttributeError) as exc:
        return None, f"liger_kernel fused-linear JSD not importable ({exc})"

    def loss(hidden, weight, t_hidden, t_weight):
        return fn(hidden, weight, t_hidden, t_weight) * TEMPERATURE ** 2

    return loss, None


def provider_fn(name: str, device: str, quick: bool):
    """(loss(hidden, weight, t_hidden, t_weight) -> scalar, None) or (None, reason it is skipped)."""
    if name == "eager":
        return eager_linear, None
    if name == "compile":
        if quick:
            return None, "--quick skips torch.compile (compilation takes tens of seconds on CPU)"
        return torch.compile(eager_linear, dynamic=False), None
    if name.startswith("linear_kd_loss["):
        backend = name[len("linear_kd_loss["):-1]
        ok, why = _backends.availability(backend)
        if not ok:
            return None, why
        if backend == "triton" and _backends.triton_interpreter():
            return None, "the Triton interpreter (TRITON_INTERPRET=1) is not timed"
        if backend != "torch" and device != "cuda":
            return None, f"the {backend} backend needs CUDA tensors"
        return (lambda h, w, th, tw: linear_kd_loss(h, w, teacher_hidden=th, teacher_weight=tw,
                                                    temperature=TEMPERATURE, backend=backend)), None
    if name == "trl_chunked":
        if device != "cuda":
            return None, "TRL's chunked divergence runs Triton GPU kernels"
        return _trl()
    if name == "liger_fljsd":
        if device != "cuda":
            return None, "Liger's fused-linear JSD runs Triton GPU kernels"
        return _liger_fljsd()
    raise ValueError(f"unknown provider {name!r}; expected one of {PROVIDERS}")


def make_inputs(n, h, ht, v, dtype, device):
    """Hidden states σ = 1 and weights scaled so both models' logits have σ ≈ 3."""
    gen = torch.Generator(device=device).manual_seed(0)  # generated on the device: no host copy
    hidden = torch.randn(n, h, generator=gen, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=gen, device=device) * (3 / h ** 0.5)).to(dtype).requires_grad_()
    t_hidden = torch.randn(n, ht, generator=gen, device=device).to(dtype)
    t_weight = (torch.randn(v, ht, generator=gen, device=device) * (3 / ht ** 0.5)).to(dtype)
    return hidden, weight, t_hidden, t_weight


def measure(name, loss_fn, size, dtype, device, reps) -> list[dict]:
    n, h, ht, v = size
    inputs = make_inputs(n, h, ht, v, dtype, device)
    hidden, weight = inputs[:2]
    base = dict(provider=name, N=n, H=h, Ht=ht, V=v, dtype=str(dtype).replace("torch.", ""))
    warmup, rep = reps

    def full():
        loss_fn(*inputs).backward()
        hidden.grad = weight.grad = None

    try:
        with torch.no_grad():
            loss_value = loss_fn(hidden.detach(), weight.detach(), *inputs[2:]).item()
        fwd = time_ms(lambda: loss_fn(*inputs), warmup=warmup, rep=rep, device=device)
        both = time_ms(full, warmup=warmup, rep=rep, grad_to_none=[hidden, weight], device=device)
        peak = peak_extra_bytes(full, device, warmup=0)
    except torch.OutOfMemoryError:
        return [dict(base, mode=mode, status="OOM") for mode in ("forward", "backward", "full")]
    flops = 2 * n * v * (3 * h + ht)
    rows = [
        dict(base, mode="forward", ms=fwd["p50"], ms_p20=fwd["p20"], ms_p80=fwd["p80"], status="ok"),
        dict(base, mode="backward", ms=both["p50"] - fwd["p50"], status="ok (full - forward)"),
        dict(base, mode="full", ms=both["p50"], ms_p20=both["p20"], ms_p80=both["p80"],
             **{"TFLOP/s": flops / (both["p50"] * 1e-3) / 1e12}, peak_MB=peak / 2 ** 20, status="ok"),
    ]
    for row in rows:
        row["loss"] = loss_value
    return rows


def parse_size(text: str) -> tuple[int, int, int, int]:
    try:
        size = tuple(int(x) for x in text.split(":"))
    except ValueError:
        size = ()
    if len(size) != 4 or min(size) < 1:
        raise argparse.ArgumentTypeError("size must be N:H:Ht:V with positive integers "
                                         f"(e.g. 4096:2048:4096:128256), got {text!r}")
    return size


def main(argv=None) -> int:
    args = loss_bench_args(__doc__, parse_size, "N:H:Ht:V", PROVIDERS, argv)
    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    sizes = args.sizes or SIZES[device + ("-quick" if args.quick else "")]
    reps = (None, None) if device == "cuda" else ((1, 2) if args.quick else (1, 3))
    rows, skipped = run_providers("linear_kd_loss", args.providers, provider_fn, sizes,
                                  lambda name, fn, size: measure(name, fn, size, dtype, device, reps), device, args.quick)
    add_ratios(rows)
    print_table(rows, COLUMNS, title=f"linear_kd_loss, forward KL T={TEMPERATURE}, {device}")
    for row in skipped:
        print(f"  {row['provider']}: {row['status']}")
    csv_path, json_path = write_results("linear_kd_loss" + ("_quick" if args.quick else ""), rows + skipped,
                                        args.out_dir, device=device)
    print(f"results: {csv_path} {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
