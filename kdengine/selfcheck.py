"""``python -m kdengine.selfcheck``: every op on every backend that runs here, against float64.

For each op (kd_loss over all divergences, linear_kd_loss, fuse_experts, fused_experts_kd_loss,
expert_batch_embed), each runnable backend (torch; triton, under the interpreter on CPU tensors
when there is no CUDA device; cuda when kdengine._C is built) and each dtype (fp32, bf16, fp16),
fresh random inputs go through the op, forward and backward with a random upstream gradient,
and through the unfused reference in float64. The table shows the largest absolute error of the
output (loss, fused log-probs or embeddings) and of the gradients, the time of the op's forward +
backward (first call, so it includes compilation), and PASS/FAIL under the tolerance table below.
Exit status 1 when any case fails.

Without a CUDA device, TRITON_INTERPRET=1 is set before anything imports triton, and sizes are
tiny so the whole run takes seconds.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
import warnings
from collections.abc import Callable

import torch

# Mirrors tests/tolerances.py (TOL and its pass rule), which this module cannot import: the tests
# package is not installed. An element passes when
#   |actual - expected| <= atol * max|expected| + rtol * |expected| + dtype subnormal spacing,
# with the table keyed by the dtype the compared tensor was produced in.
TOL = {
    torch.float64: dict(atol=1e-12, rtol=1e-9),
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.bfloat16: dict(atol=1e-3, rtol=2.0**-6),
    torch.float16: dict(atol=1e-3, rtol=2.0**-9),
}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DIVERGENCES = ("forward_kl", "reverse_kl", "soft_ce", "jsd", "tvd", "mse")


def compare(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> tuple[float, bool]:
    """(max |actual − expected|, within TOL[dtype]) in float64; shapes and non-finite positions must match."""
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    if a.shape != e.shape:
        return float("inf"), False
    finite = torch.isfinite(e)
    if not torch.equal(finite, torch.isfinite(a)) or not torch.equal(a[~finite], e[~finite]):
        return float("inf"), False
    a, e = a[finite], e[finite]
    if a.numel() == 0:
        return 0.0, True
    tol = TOL[dtype]
    info = torch.finfo(dtype)
    scale = max(e.abs().max().item(), info.smallest_normal)
    diff = (a - e).abs()
    allowed = tol["atol"] * scale + tol["rtol"] * e.abs() + info.smallest_normal * info.eps
    return diff.max().item(), bool((diff <= allowed).all())


def _leaf(x: torch.Tensor, requires_grad: bool = True) -> torch.Tensor:
    return x.detach().clone().requires_grad_(requires_grad)


def _grads_vs(pairs, dtype_of) -> tuple[float, bool]:
    """Worst error and verdict over (ours, reference) leaf pairs."""
    worst, ok = 0.0, True
    for ours, ref in pairs:
        if ours.grad is None or ref.grad is None:
            return float("inf"), False
        err, good = compare(ours.grad, ref.grad, dtype_of(ours))
        worst, ok = max(worst, err), ok and good
    return worst, ok


def _labels(n: int, v: int, device) -> torch.Tensor:
    labels = torch.randint(0, v, (n,), device=device)
    labels[::2] = -100
    return labels


def check_kd_loss(backend, dtype, device, sizes, divergence):
    from kdengine.ops import kd_loss  # noqa: PLC0415
    from kdengine.reference.kd_loss import kd_loss_reference  # noqa: PLC0415

    n, v = sizes["rows"], sizes["vocab"]
    student = _leaf((torch.randn(n, v, device=device) * 3).to(dtype))
    teacher = _leaf((torch.randn(n, v, device=device) * 3).to(dtype))
    options = dict(divergence=divergence, temperature=2.0, jsd_beta=0.3, labels=_labels(n, v, device),
                   hard_weight=0.5)
    grad_out = torch.rand((), device=device) + 0.5

    def run():
        loss = kd_loss(student, teacher, backend=backend, **options)
        loss.backward(grad_out)
        return loss

    s64, t64 = _leaf(student.double()), _leaf(teacher.double())
    ref = kd_loss_reference(s64, t64, **options)
    ref.backward(grad_out.double())
    return run, ref, torch.float32, [(student, s64), (teacher, t64)]


def check_linear_kd_loss(backend, dtype, device, sizes, divergence):
    from kdengine.ops import linear_kd_loss  # noqa: PLC0415
    from kdengine.reference.kd_loss import kd_loss_reference  # noqa: PLC0415

    n, v, h = sizes["rows"], sizes["vocab"], sizes["hidden"]
    hidden = _leaf(torch.randn(n, h, device=device).to(dtype))
    weight = _leaf((torch.randn(v, h, device=device) * 3 / h ** 0.5).to(dtype))
    t_hidden = torch.randn(n, h + 8, device=device).to(dtype)
    t_weight = (torch.randn(v, h + 8, device=device) * 3 / (h + 8) ** 0.5).to(dtype)
    options = dict(divergence=divergence, temperature=2.0, labels=_labels(n, v, device), hard_weight=0.5)
    grad_out = torch.rand((), device=device) + 0.5

    def run():
        loss = linear_kd_loss(hidden, weight, teacher_hidden=t_hidden, teacher_weight=t_weight,
                              chunk_size=max(1, n // 3), backend=backend, **options)
        loss.backward(grad_out)
        return loss

    h64, w64 = _leaf(hidden.double()), _leaf(weight.double())
    ref = kd_loss_reference(h64 @ w64.T, t_hidden.double() @ t_weight.double().T, **options)
    ref.backward(grad_out.double())
    return run, ref, torch.float32, [(hidden, h64), (weight, w64)]


def check_fuse_experts(backend, dtype, device, sizes, space):
    from kdengine.ops import fuse_experts  # noqa: PLC0415
    from kdengine.reference.fuse_experts import fuse_experts_reference  # noqa: PLC0415

    k, n, v = sizes["experts"], sizes["rows"], sizes["vocab"]
    experts = _leaf((torch.randn(k, n, v, device=device) * 3).to(dtype))
    upstream = torch.randn(n, v, device=device)
    options = dict(weighting="entropy", space=space, temperature=2.0)

    def run():
        log_probs, _, _ = fuse_experts(experts, backend=backend, **options)
        log_probs.backward(upstream.to(log_probs.dtype))
        return log_probs

    e64 = _leaf(experts.double())
    ref, _, _ = fuse_experts_reference(e64, **options)
    ref.backward(upstream.double())
    return run, ref, torch.float32, [(experts, e64)]


def check_fused_experts_kd_loss(backend, dtype, device, sizes, space):
    from kdengine.ops import fused_experts_kd_loss  # noqa: PLC0415
    from kdengine.reference.fuse_experts import fused_experts_kd_loss_reference  # noqa: PLC0415

    k, n, v = sizes["experts"], sizes["rows"], sizes["vocab"]
    student = _leaf((torch.randn(n, v, device=device) * 3).to(dtype))
    experts = _leaf((torch.randn(k, n, v, device=device) * 3).to(dtype))
    options = dict(weighting="entropy", space=space, temperature=2.0, labels=_labels(n, v, device),
                   hard_weight=0.5)
    grad_out = torch.rand((), device=device) + 0.5

    def run():
        loss = fused_experts_kd_loss(student, experts, backend=backend, **options)
        loss.backward(grad_out)
        return loss

    s64, e64 = _leaf(student.double()), _leaf(experts.double())
    ref = fused_experts_kd_loss_reference(s64, e64, **options)
    ref.backward(grad_out.double())
    return run, ref, torch.float32, [(student, s64), (experts, e64)]


def check_expert_batch_embed(backend, dtype, device, sizes, placement):
    from kdengine.ops import expert_batch_embed  # noqa: PLC0415
    from kdengine.reference.expert_batch_embed import expert_batch_embed_reference  # noqa: PLC0415

    b, length, k, p, h, vocab = 3, 7, sizes["experts"], 4, sizes["hidden"], 50
    input_ids = torch.randint(0, vocab, (b, length), device=device)
    mask = torch.ones(b, length, dtype=torch.long, device=device)
    mask[1, 5:] = 0  # right padding on one example
    weight = _leaf(torch.randn(vocab, h, device=device).to(dtype))
    prompts = _leaf(torch.randn(k, p, h, device=device).to(dtype))
    upstream = torch.randn(k * b, p + length, h, device=device).to(dtype)  # the same values on both sides
    ref_mask = None

    def run():
        embeds, out_mask = expert_batch_embed(input_ids, weight, prompts, attention_mask=mask,
                                              placement=placement, backend=backend)
        embeds.backward(upstream)
        if not torch.equal(out_mask.cpu(), ref_mask.cpu()):
            raise AssertionError("attention mask differs from the reference")
        return embeds

    w64, p64 = _leaf(weight.double()), _leaf(prompts.double())
    ref, ref_mask = expert_batch_embed_reference(input_ids, w64, p64, attention_mask=mask,
                                                 placement=placement)
    ref.backward(upstream.double())
    return run, ref, dtype, [(weight, w64), (prompts, p64)]


CHECKS: list[tuple[str, Callable, tuple]] = [
    ("kd_loss", check_kd_loss, DIVERGENCES),
    ("linear_kd_loss", check_linear_kd_loss, ("forward_kl", "jsd")),
    ("fuse_experts", check_fuse_experts, ("logit", "prob")),
    ("fused_experts_kd_loss", check_fused_experts_kd_loss, ("logit", "prob")),
    ("expert_batch_embed", check_expert_batch_embed, ("prepend", "append")),
]


def run_case(check, backend, dtype, device, sizes, case) -> dict:
    row = dict(backend=backend, dtype=str(dtype).replace("torch.", ""), case=case)
    try:
        run, ref, out_dtype, leaves = check(backend, dtype, device, sizes, case)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        row["ms"] = (time.perf_counter() - start) * 1e3
        row["out_err"], out_ok = compare(out, ref, out_dtype)
        row["grad_err"], grad_ok = _grads_vs(leaves, lambda t: t.dtype)
        row["result"] = "PASS" if out_ok and grad_ok else "FAIL"
    except Exception as exc:  # a crashing backend is a failed check, reported with the rest
        row["result"] = f"FAIL ({type(exc).__name__}: {exc})"
        row["trace"] = traceback.format_exc()
    return row


def backends_here() -> tuple[list[str], list[str]]:
    """(runnable backends, lines saying why the others are not)."""
    from kdengine.ops._backends import BACKENDS, availability  # noqa: PLC0415

    runnable, notes = [], []
    for name in BACKENDS:
        ok, why = availability(name)
        (runnable.append(name) if ok else notes.append(f"  {name}: skipped ({why})"))
    return runnable, notes


def _fmt(key: str, value) -> str:
    if value is None:
        return "-"
    if key == "ms":
        return f"{value:.1f}"
    if isinstance(value, float):
        return f"{value:.2e}"
    return str(value)


def main() -> int:
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
        # The interpreter evaluates both sides of tl.where with numpy: masked lanes warn about 0·inf.
        warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton")
    torch.manual_seed(int(os.environ.get("KDENGINE_SELFCHECK_SEED", "0")))
    device = torch.device("cuda" if cuda else "cpu")
    sizes = (dict(rows=64, vocab=32003, hidden=256, experts=4) if cuda
             else dict(rows=5, vocab=1009, hidden=16, experts=3))
    runnable, notes = backends_here()
    where = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"kdengine selfcheck on {where} (torch {torch.__version__}); "
          f"sizes {sizes}; backends: {', '.join(runnable)}")
    for line in notes:
        print(line)
    header = ("op", "case", "backend", "dtype", "max|out err|", "max|grad err|", "ms", "result")
    rows = []
    for op, check, cases in CHECKS:
        for backend in runnable:
            for dtype in DTYPES:
                for case in cases:
                    rows.append(dict(op=op, **run_case(check, backend, dtype, device, sizes, case)))
    cells = [[_fmt(k, r.get(k)) for k in ("op", "case", "backend", "dtype", "out_err", "grad_err", "ms",
                                          "result")]
             for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for c in cells:
        print("  ".join(x.ljust(w) for x, w in zip(c, widths)))
    failed = [r for r in rows if r["result"] != "PASS"]
    for r in failed:
        if "trace" in r:
            print(f"\n{r['op']} {r['case']} {r['backend']} {r['dtype']}:\n{r['trace']}", file=sys.stderr)
    print(f"\n{len(rows) - len(failed)} of {len(rows)} checks passed"
          + ("" if not failed else f"; {len(failed)} FAILED"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
