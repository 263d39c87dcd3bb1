"""Memory traffic of the loss ops, counted on CPU, in units of one pass over an [N, V] tensor.

A memory-bound kernel's speed on a GPU is the bytes it moves, and those can be counted exactly
without a GPU: under ``TRITON_INTERPRET=1`` every ``tl.load`` / ``tl.store`` of a Triton kernel goes
through the interpreter's masked load and store, which :class:`TrafficCounter` hooks (the bytes
of the lanes whose mask is true, attributed by address to the named tensors); the eager PyTorch ops
around the kernels (an ``.contiguous()`` copy, a ``mul_`` by grad_output, a reduction) are counted by a
``TorchDispatchMode``: each op reads its tensor inputs and writes its outputs (views, allocations
and metadata ops move nothing; ops run by the interpreter itself are not counted).

One unit is N · V · itemsize of the input dtype: "5" means the op moved as many bytes as five
passes over the logits. On a GPU, each unit of a bf16 N=16384, V=128256 problem costs ~0.98 ms at
4.3 TB/s. The targets (issue 15) are the design's pass counts; :data:`TARGETS` lists them and
tests/ops/test_traffic.py asserts them on every divergence, bf16 and fp32.

    python -m benchmarks.traffic            # prints the table of docs/kernels.md
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections import defaultdict
from collections.abc import Callable

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Traffic targets per scenario (units of one [N, V] pass, forward + backward with the student's
# gradient; "forward" = no gradient asked). K=4 experts for the fused op.
TARGETS = {
    ("kd_loss", "forward_kl"): 5, ("kd_loss", "reverse_kl"): 5, ("kd_loss", "soft_ce"): 5,
    ("kd_loss", "jsd"): 7, ("kd_loss", "tvd"): 7, ("kd_loss", "mse"): 5,
    ("kd_loss forward only", "forward_kl"): 2, ("kd_loss forward only", "reverse_kl"): 2,
    ("kd_loss forward only", "soft_ce"): 2, ("kd_loss forward only", "mse"): 2,
    ("kd_loss forward only", "jsd"): 4, ("kd_loss forward only", "tvd"): 4,
    # K=4, logit space: experts read twice (forward + backward) when α is known up front (uniform
    # or given weights), three times when it needs the row's entropies first; student twice.
    ("fused_experts_kd_loss K=4 logit uniform", "forward_kl"): 11,
    ("fused_experts_kd_loss K=4 logit entropy", "forward_kl"): 15,
}
# Ops that move no tensor data (allocation, views, metadata).
_FREE = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "alias",
         "lift_fresh", "set_", "_local_scalar_dense", "resolve_conj", "resolve_neg"}


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class TrafficCounter(TorchDispatchMode):
    """Counts bytes read and written per named tensor (``"other"`` for the rest) while active.

    Usage::

        with TrafficCounter(student=s, teacher=t) as traffic:
            loss = kd_loss(s, t, backend="triton"); loss.backward()
        traffic.total() / (s.numel() * s.element_size())

    Needs ``TRITON_INTERPRET=1`` (set before triton is imported) for the kernels to be counted.
    """

    def __init__(self, **named: torch.Tensor):
        super().__init__()
        self.named = named
        self.bytes: dict[tuple[str, str], int] = defaultdict(int)  # (name, "read" | "write") -> bytes
        self._in_kernel = 0
        self._patches = contextlib.ExitStack()

    # -- attribution --------------------------------------------------------------------------------
    def _name_of(self, t: torch.Tensor) -> str:
        ptr = t.untyped_storage().data_ptr()
        for name, ref in self.named.items():
            if ref is not None and ref.untyped_storage().data_ptr() == ptr:
                return name
        return "other"

    def _add_addresses(self, addresses: np.ndarray, itemsize: int, kind: str) -> None:
        addresses = addresses.ravel()
        left = np.ones(addresses.shape, dtype=bool)
        for name, ref in self.named.items():
            if ref is None:
                continue
            storage = ref.untyped_storage()
            lo = storage.data_ptr()
            inside = left & (addresses >= lo) & (addresses < lo + storage.nbytes())
            self.bytes[(name, kind)] += int(inside.sum()) * itemsize
            left &= ~inside
        self.bytes[("other", kind)] += int(left.sum()) * itemsize

    # -- Triton interpreter hooks ---------------------------------------------------------------------
    def _hook_interpreter(self) -> None:
        from triton.runtime import interpreter  # noqa: PLC0415

        builder = interpreter.InterpreterBuilder
        counter = self
        load, store, call = builder.create_masked_load, builder.create_masked_store, interpreter.GridExecutor.__call__

        def itemsize(ptrs) -> int:
            return ptrs.get_element_ty().primitive_bitwidth // 8

        # The trailing cache/eviction arguments differ between Triton releases (3.6: cache_modifier,
        # eviction_policy; 3.9: cache_policy): pass them through untouched.
        def masked_load(self, ptrs, mask, *rest):
            live = np.broadcast_to(mask.data, ptrs.data.shape)
            counter._add_addresses(ptrs.data[live], itemsize(ptrs), "read")
            return load(self, ptrs, mask, *rest)

        def masked_store(self, ptrs, value, mask, *rest):
            live = np.broadcast_to(mask.data, ptrs.data.shape)
            counter._add_addresses(ptrs.data[live], itemsize(ptrs), "write")
            return store(self, ptrs, value, mask, *rest)

        def run_kernel(self, *args, **kwargs):
            counter._in_kernel += 1  # the interpreter's own host copies are not kernel traffic
            try:
                return call(self, *args, **kwargs)
            finally:
                counter._in_kernel -= 1

        for owner, attr, fn in ((builder, "create_masked_load", masked_load),
                                (builder, "create_masked_store", masked_store),
                                (interpreter.GridExecutor, "__call__", run_kernel)):
            self._patches.callback(setattr, owner, attr, getattr(owner, attr))
            setattr(owner, attr, fn)

    def __enter__(self):
        if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            raise RuntimeError("TrafficCounter counts Triton kernels under TRITON_INTERPRET=1 only")
        self._hook_interpreter()
        return super().__enter__()

    def __exit__(self, *exc):
        self._patches.close()
        return super().__exit__(*exc)

    # -- eager ops ----------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self._in_kernel or func.is_view or func.overloadpacket.__name__ in _FREE:
            return out
        inputs = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        if func.overloadpacket.__name__ == "copy_":
            inputs = inputs[1:]  # copy_(dst, src) reads src only
        for t in inputs:
            self.bytes[(self._name_of(t), "read")] += _nbytes(t)
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.bytes[(self._name_of(t), "write")] += _nbytes(t)
        return out

    # -- results ------------------------------------------------------------------------------------
    def total(self) -> int:
        return sum(self.bytes.values())

    def breakdown(self, unit: int) -> dict[str, float]:
        """{"<name> read": units, "<name> write": units} for every entry with traffic."""
        return {f"{name} {kind}": count / unit for (name, kind), count in sorted(self.bytes.items()) if count}


def _logits(n: int, v: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=gen) * 3).to(dtype)


def measure(run: Callable[[], None], unit: int, **named: torch.Tensor) -> tuple[float, dict[str, float]]:
    """(total units, per-tensor breakdown) of ``run()``; one unit is ``unit`` bytes."""
    with TrafficCounter(**named) as traffic:
        run()
    return traffic.total() / unit, traffic.breakdown(unit)


def kd_loss_traffic(divergence: str, dtype: torch.dtype, *, grad: bool = True, n: int = 4, v: int = 4099,
                    backend: str = "triton") -> tuple[float, dict[str, float]]:
    """kd_loss (batchmean, T=2, student gradient only when ``grad``) forward (+ backward)."""
    from kdengine.ops import kd_loss  # noqa: PLC0415

    student = _logits(n, v, dtype, 0).requires_grad_(grad)
    teacher = _logits(n, v, dtype, 1)

    def run():
        loss = kd_loss(student, teacher, divergence=divergence, temperature=2.0, backend=backend)
        if grad:
            loss.backward(torch.tensor(2.0))

    return measure(run, n * v * student.element_size(), student=student, teacher=teacher)


def fused_experts_traffic(divergence: str, dtype: torch.dtype, *, k: int = 4, weighting: str = "entropy",
                          n: int = 2, v: int = 16411, backend: str = "triton") -> tuple[float, dict[str, float]]:
    """fused_experts_kd_loss (logit space, T=2, student gradient) forward + backward. The default V
    is larger than kd_loss's: the row statistics (≈ 40 fp32 per row at K=4) stay ≤ 0.02 units."""
    from kdengine.ops import fused_experts_kd_loss  # noqa: PLC0415

    student = _logits(n, v, dtype, 0).requires_grad_()
    experts = torch.stack([_logits(n, v, dtype, 1 + i) for i in range(k)])

    def run():
        loss = fused_experts_kd_loss(student, experts, divergence=divergence, weighting=weighting, space="logit",
                                     temperature=2.0, backend=backend)
        loss.backward(torch.tensor(2.0))

    return measure(run, n * v * student.element_size(), student=student, experts=experts)


def fuse_experts_backward_traffic(space: str, dtype: torch.dtype, *, k: int = 4, n: int = 2, v: int = 4099,
                                  backend: str = "triton") -> dict[str, float]:
    """Per-tensor breakdown of ``fuse_experts``' backward alone (entropy weighting), in units of one
    pass over the [K, N, V] experts: its closed form reads them 0 times in logit space, once in prob."""
    from kdengine.ops import fuse_experts  # noqa: PLC0415

    experts = torch.stack([_logits(n, v, dtype, 1 + i) for i in range(k)]).requires_grad_()
    log_probs, _, _ = fuse_experts(experts, weighting="entropy", space=space, temperature=2.0, backend=backend)
    grad = torch.randn(log_probs.shape, generator=torch.Generator().manual_seed(9))
    return measure(lambda: log_probs.backward(grad), experts.numel() * experts.element_size(),
                   experts=experts)[1]


DIVERGENCE_NAMES = ("forward_kl", "reverse_kl", "soft_ce", "jsd", "tvd", "mse")


def table(dtypes=(torch.bfloat16, torch.float32)) -> list[tuple[str, str, str, float, int | None]]:
    """(op, divergence, dtype, measured units, target) for every scenario."""
    rows = []
    for dtype in dtypes:
        label = str(dtype).replace("torch.", "")
        for div in DIVERGENCE_NAMES:
            rows.append(("kd_loss", div, label, kd_loss_traffic(div, dtype)[0], TARGETS[("kd_loss", div)]))
            rows.append(("kd_loss forward only", div, label, kd_loss_traffic(div, dtype, grad=False)[0],
                         TARGETS[("kd_loss forward only", div)]))
        for weighting in ("uniform", "entropy"):
            op = f"fused_experts_kd_loss K=4 logit {weighting}"
            for div in ("forward_kl", "jsd"):
                rows.append((op, div, label, fused_experts_traffic(div, dtype, weighting=weighting)[0],
                             TARGETS.get((op, div))))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.parse_args(argv)
    print("| op | divergence | dtype | units (fwd+bwd) | target |")
    print("|---|---|---|---|---|")
    for op, div, dtype, units, target in table():
        print(f"| {op} | {div} | {dtype} | {units:.2f} | {'—' if target is None else target} |")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")
    raise SystemExit(main())
