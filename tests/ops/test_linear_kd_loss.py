"""linear_kd_loss: every backend against the float64 reference ``kd_loss_reference(h @ Wᵀ, ...)``.

Each case draws fresh random hidden states and weights (seeded per test by tests/conftest.py),
runs the chunked op, and compares the loss (fp32, TOL[float32]) and every gradient (in its
input's dtype) with float64 autograd through the unfused logits. Sizes stay tiny so the Triton
interpreter fits the budget; chunk sizes deliberately do not divide N.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from kdengine.ops import BackendUnavailable
from kdengine.ops.kd_loss import make_spec
from kdengine.ops.linear_kd_loss import default_chunk_rows, linear_kd_loss
from kdengine.reference.kd_loss import kd_loss_reference
from tests.conftest import device_for
from tests.tolerances import assert_close

# The module (kdengine.ops exports the function under the same name).
linear_module = importlib.import_module("kdengine.ops.linear_kd_loss")

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

# n, h, v, dtype, teacher ("logits" | "head"), divergence, jsd_beta, temperature, reduction, normalizer,
# labels ("none" | "ignored" | "hard"), chunk, grads ({"h", "w", "t"}), grad_output, layout
CASES = [
    dict(n=7, h=16, v=1009, dtype=torch.float32, teacher="logits", divergence="forward_kl", temperature=2.0,
         reduction="batchmean", labels="ignored", chunk=3, grads="hw", grad_output=2.5, layout="contiguous"),
    dict(n=7, h=16, v=101, dtype=torch.float32, teacher="head", divergence="reverse_kl", temperature=1.0,
         reduction="sum", labels="hard", chunk=4, grads="hwt", grad_output=1.0, layout="transposed"),
    dict(n=5, h=24, v=257, dtype=torch.bfloat16, teacher="head", divergence="jsd", jsd_beta=0.3,
         temperature=1.5, reduction="batchmean", labels="hard", chunk=2, grads="hw", grad_output=0.7,
         layout="contiguous"),
    dict(n=6, h=8, v=509, dtype=torch.float16, teacher="logits", divergence="soft_ce", temperature=0.7,
         reduction="mean", labels="none", chunk=4, grads="hwt", grad_output=3.0, layout="strided"),
    dict(n=5, h=16, v=211, dtype=torch.bfloat16, teacher="logits", divergence="tvd", temperature=1.0,
         reduction="none", labels="ignored", chunk=2, grads="hwt", grad_output=1.5, layout="strided"),
    dict(n=7, h=12, v=131, dtype=torch.float32, teacher="head", divergence="mse", temperature=1.0,
         reduction="none", labels="hard", chunk=3, grads="hwt", grad_output=0.5, layout="contiguous"),
    dict(n=1, h=8, v=997, dtype=torch.float32, teacher="logits", divergence="forward_kl", temperature=3.0,
         reduction="batchmean", labels="none", chunk=None, grads="h", grad_output=1.0, layout="contiguous"),
    dict(n=2, h=4, v=65537, dtype=torch.float32, teacher="head", divergence="forward_kl", temperature=1.0,
         reduction="sum", labels="none", chunk=1, grads="hw", grad_output=1.0, layout="contiguous"),
    dict(n=6, h=16, v=127, dtype=torch.bfloat16, teacher="logits", divergence="forward_kl", temperature=2.0,
         reduction="batchmean", normalizer=4.0, labels="hard", chunk=5, grads="w", grad_output=1.0,
         layout="transposed", masked=True),
]


def case_id(c: dict) -> str:
    dtype = str(c["dtype"]).replace("torch.", "")
    return (f"{c['divergence']}-{c['reduction']}-{dtype}-{c['n']}x{c['h']}x{c['v']}-{c['teacher']}-"
            f"chunk{c['chunk']}-{c['labels']}-{c['grads']}-{c['layout']}")


def make(shape, dtype, layout: str, device, scale: float = 1.0) -> torch.Tensor:
    """Random [a, b] matrix with a contiguous, row-strided or transposed layout."""
    a, b = shape
    if layout == "transposed":
        x = (torch.randn(b, a) * scale).to(dtype).t()
    elif layout == "strided":
        x = (torch.randn(a, b + 7) * scale).to(dtype)[:, 3:3 + b]
    else:
        x = (torch.randn(a, b) * scale).to(dtype)
    return x.to(device)


def labels_for(kind: str, n: int, v: int, device):
    """(labels, hard_weight): None, some rows ignored, or ignored rows plus a hard-label CE."""
    if kind == "none":
        return None, 0.0
    labels = torch.randint(1, v - 1, (n,))
    if n > 1:
        labels[::2] = -100
    return labels.to(device), 0.6 if kind == "hard" else 0.0


def run_case(backend: str, c: dict) -> None:
    device = device_for(backend)
    n, h, v, dtype = c["n"], c["h"], c["v"], c["dtype"]
    # Scales giving logits of σ ≈ 3, as real LM heads do.
    hidden = make((n, h), dtype, c["layout"], device).requires_grad_("h" in c["grads"])
    weight = make((v, h), dtype, c["layout"], device, 3.0 / h ** 0.5).requires_grad_("w" in c["grads"])
    teacher_grad = "t" in c["grads"]
    if c["teacher"] == "logits":
        t_logits = make((n, v), dtype, c["layout"], device, 3.0)
        if c.get("masked"):
            t_logits[:, [0, v // 2, v - 1]] = float("-inf")
        teacher = dict(teacher_logits=t_logits.requires_grad_(teacher_grad))
    else:
        ht = h + 5
        teacher = dict(teacher_hidden=make((n, ht), dtype, "contiguous", device).requires_grad_(teacher_grad),
                       teacher_weight=make((v, ht), dtype, "contiguous", device, 3.0 / ht ** 0.5))
    labels, hard_weight = labels_for(c["labels"], n, v, device)
    row_weights = (torch.rand(n) + 0.5).to(device) if c["reduction"] == "none" else None
    options = dict(divergence=c["divergence"], temperature=c["temperature"], jsd_beta=c.get("jsd_beta", 0.5),
                   hard_weight=hard_weight, reduction=c["reduction"], normalizer=c.get("normalizer"))

    loss = linear_kd_loss(hidden, weight, labels=labels, row_weights=row_weights, chunk_size=c["chunk"],
                          backend=backend, **teacher, **options)

    h64 = hidden.detach().double().requires_grad_(hidden.requires_grad)
    w64 = weight.detach().double().requires_grad_(weight.requires_grad)
    t64 = {k: x.detach().double().requires_grad_(x.requires_grad) for k, x in teacher.items()}
    t_logits64 = (t64["teacher_logits"] if "teacher_logits" in t64
                  else t64["teacher_hidden"] @ t64["teacher_weight"].T)
    want = kd_loss_reference(h64 @ w64.T, t_logits64, labels=labels,
                             row_weights=None if row_weights is None else row_weights.double(), **options)
    assert loss.dtype == torch.float32 and loss.shape == want.shape
    assert_close(loss, want, torch.float32, msg="loss")

    grad_output = torch.full(loss.shape, c["grad_output"])
    if c["reduction"] == "none":
        grad_output = grad_output * (torch.rand(n) + 0.5)
    loss.backward(grad_output.to(device))
    want.backward(grad_output.double())
    pairs = [("student_hidden", hidden, h64), ("student_weight", weight, w64)]
    pairs += [(k, teacher[k], t64[k]) for k in teacher]
    for name, x, x64 in pairs:
        if x.requires_grad:
            assert x.grad is not None and x.grad.dtype == dtype and x.grad.shape == x.shape, name
            assert_close(x.grad, x64.grad, dtype, msg=f"grad {name}")
        else:
            assert x.grad is None, name


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_reference(backend, case):
    run_case(backend, case)


@pytest.mark.parametrize("source", ["teacher_logits", "teacher_hidden"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_nonfinite_teacher_gives_nan_row(backend, dtype, source):
    """A NaN (row 1) or +inf (row 2) in the teacher's logits or hidden states: those rows' losses and
    student gradients are NaN (never a finite loss from a broken teacher); the others stay finite."""
    device = device_for(backend)
    n, h, v = 4, 8, 131
    hidden = make((n, h), dtype, "contiguous", device).requires_grad_()
    weight = make((v, h), dtype, "contiguous", device, 3.0 / h ** 0.5)
    if source == "teacher_logits":
        teacher = dict(teacher_logits=make((n, v), dtype, "contiguous", device, 3.0))
        teacher["teacher_logits"][1, 5], teacher["teacher_logits"][2, 9] = float("nan"), float("inf")
    else:
        teacher = dict(teacher_hidden=make((n, h), dtype, "contiguous", device),
                       teacher_weight=make((v, h), dtype, "contiguous", device, 3.0 / h ** 0.5))
        teacher["teacher_hidden"][1, 2], teacher["teacher_hidden"][2, 3] = float("nan"), float("inf")
    loss = linear_kd_loss(hidden, weight, reduction="none", chunk_size=3, backend=backend, **teacher)
    rows = loss.detach().cpu()
    assert torch.isnan(rows[1:3]).all() and torch.isfinite(rows[[0, 3]]).all(), rows
    loss.sum().backward()
    grad = hidden.grad.cpu()
    assert torch.isnan(grad[1:3]).all() and torch.isfinite(grad[[0, 3]]).all()
    reduced = linear_kd_loss(hidden, weight, backend=backend, **teacher)
    assert torch.isnan(reduced)


@pytest.mark.parametrize("divergence", ["forward_kl", "tvd"])
def test_rows_primitive_mixed_dtypes(backend, divergence):
    """The rows primitive of each chunk takes fp32 student logits against bf16 teacher logits as given
    (no fp32 copy of the teacher) and writes bf16 gradients directly when asked (grad_dtypes)."""
    device = device_for(backend)
    n, v = 3, 257
    student = (torch.randn(n, v) * 3).to(device)
    teacher = (torch.randn(n, v) * 3).to(torch.bfloat16).to(device)
    spec = make_spec(divergence=divergence, temperature=2.0, t2_scale=True, jsd_beta=0.5, ignore_index=-100,
                     kd_weight=1.0, hard_weight=0.0)
    primitive = linear_module._torch_rows if backend == "torch" else linear_module._kernel_rows(backend)
    scale = torch.tensor(0.7, device=device)
    row_loss, grad_s, grad_t = primitive(student, teacher, None, None, scale, spec, True, True,
                                         (torch.bfloat16, None))
    s64, t64 = student.double().cpu().requires_grad_(), teacher.double().cpu().requires_grad_()
    want = kd_loss_reference(s64, t64, divergence=divergence, temperature=2.0, reduction="none")
    (want.sum() * 0.7).backward()
    assert_close(row_loss.cpu(), want, torch.float32, msg="row_loss")
    assert grad_s.dtype == torch.bfloat16 and grad_t.dtype == torch.bfloat16
    assert_close(grad_s.cpu(), s64.grad, torch.bfloat16, msg="bf16 grad of fp32 student logits")
    assert_close(grad_t.cpu(), t64.grad, torch.bfloat16, msg="grad of bf16 teacher logits")


def test_float64_gradcheck_reduction_none():
    """float64 end to end (torch backend): the recompute-in-backward path of reduction='none'."""
    h = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 6, dtype=torch.float64, requires_grad=True)
    th = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    tw = torch.randn(11, 4, dtype=torch.float64, requires_grad=True)

    def fn(h, w, th, tw):
        return linear_kd_loss(h, w, teacher_hidden=th, teacher_weight=tw, divergence="jsd", temperature=1.7,
                              reduction="none", chunk_size=2, backend="torch")

    assert torch.autograd.gradcheck(fn, (h, w, th, tw))


def test_chunks_never_exceed_chunk_size(monkeypatch):
    """The logits exist one chunk at a time: every logits matmul has at most chunk_size rows."""
    seen = []
    original = linear_module._Head.logits

    def spy(self, rows):
        out = original(self, rows)
        seen.append(tuple(out.shape))
        return out

    monkeypatch.setattr(linear_module._Head, "logits", spy)
    h = torch.randn(10, 8, requires_grad=True)
    w = torch.randn(50, 8, requires_grad=True)
    th, tw = torch.randn(10, 6), torch.randn(50, 6)
    linear_kd_loss(h, w, teacher_hidden=th, teacher_weight=tw, chunk_size=4, backend="torch").backward()
    assert sorted(seen) == sorted([(4, 50), (4, 50), (2, 50)] * 2)


def test_default_chunk_rows():
    assert default_chunk_rows(128256, torch.device("cuda")) == 4096
    assert default_chunk_rows(32000, torch.device("cuda")) == 4096
    assert default_chunk_rows(32000, torch.device("cpu")) == (1 << 22) // 32000
    assert default_chunk_rows(10**9, torch.device("cpu")) == 1


def test_backward_twice_raises_and_none_recomputes():
    h = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(30, 8, requires_grad=True)
    t = torch.randn(4, 30)
    loss = linear_kd_loss(h, w, t, backend="torch")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()
    rows = linear_kd_loss(h, w, t, reduction="none", backend="torch")
    h.grad = None
    rows.sum().backward(retain_graph=True)
    first = h.grad.clone()
    rows.sum().backward()
    torch.testing.assert_close(h.grad, 2 * first)


def test_no_grad_inputs_give_a_constant():
    loss = linear_kd_loss(torch.randn(3, 4), torch.randn(9, 4), torch.randn(3, 9), backend="torch")
    assert loss.grad_fn is None and loss.dim() == 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(h=(4, 8), w=(10, 6), t=(4, 10)), r"student_hidden has H=8 but student_weight has H=6"),
    (dict(h=(4, 8), w=(10, 8), t=(4, 11)), r"student_weight has V=10 but teacher_logits has V=11"),
    (dict(h=(4, 8), w=(10, 8), t=(3, 10)), r"student_hidden has N=4 rows but teacher_logits has N=3"),
    (dict(h=(4, 8), w=(10, 8)), r"no teacher"),
    (dict(h=(4, 8), w=(10, 8), t=(4, 10), th=(4, 5), tw=(10, 5)), r"exactly one teacher source"),
    (dict(h=(4, 8), w=(10, 8), th=(4, 5)), r"teacher_weight \[V, Ht\] is missing"),
    (dict(h=(4, 8), w=(10, 8), th=(4, 5), tw=(10, 6)), r"teacher_hidden has H=5 but teacher_weight has H=6"),
    (dict(h=(4, 8), w=(10, 8), th=(4, 5), tw=(12, 5)),
     r"student_weight has V=10 but teacher_weight has V=12"),
    (dict(h=(4, 8), w=(10, 8), th=(2, 5), tw=(10, 5)),
     r"student_hidden has N=4 rows but teacher_hidden has N=2"),
    (dict(h=(4, 8, 2), w=(10, 8), t=(4, 10)), r"student_hidden must be 2-D \[N, H\]"),
    (dict(h=(4, 8), w=(10, 8), t=(4, 10), chunk_size=0), r"chunk_size must be a positive integer"),
    (dict(h=(4, 8), w=(10, 8), t=(4, 10), hard_weight=0.5), r"hard_weight != 0 needs labels"),
    (dict(h=(4, 8), w=(10, 8), t=(4, 10), divergence="kl"), r"unknown divergence 'kl'"),
])
def test_bad_input_raises_value_error(kwargs, match):
    kwargs = dict(kwargs)
    args = {name: torch.randn(*kwargs.pop(key)) for key, name in
            (("h", "student_hidden"), ("w", "student_weight"), ("t", "teacher_logits"),
             ("th", "teacher_hidden"), ("tw", "teacher_weight")) if key in kwargs}
    with pytest.raises(ValueError, match=match):
        linear_kd_loss(**args, **kwargs, backend="torch")


def test_dtype_mismatch_of_a_head_raises():
    with pytest.raises(ValueError,
                       match="student_hidden is torch.bfloat16 but student_weight is torch.float32"):
        linear_kd_loss(torch.randn(2, 4, dtype=torch.bfloat16), torch.randn(5, 4), torch.randn(2, 5))


def test_float64_needs_the_torch_backend():
    h, w, t = (torch.randn(2, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64),
               torch.randn(2, 5, dtype=torch.float64))
    with pytest.raises(BackendUnavailable, match="float64"):
        linear_kd_loss(h, w, t, backend="triton")


def test_torch_backend_sub_chunks_a_large_chunk():
    """A chunk wider than kd_loss's torch-backend chunk (15 rows at V = 65537) is split again inside."""
    n, h, v = 37, 4, 65537
    hidden = torch.randn(n, h, requires_grad=True)
    weight = (torch.randn(v, h) * 1.5).requires_grad_()
    teacher = torch.randn(n, v) * 3
    labels = torch.randint(0, v, (n,))
    labels[::3] = -100
    loss = linear_kd_loss(hidden, weight, teacher, labels=labels, hard_weight=0.5, divergence="reverse_kl",
                          chunk_size=n, backend="torch")
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    want = kd_loss_reference(h64 @ w64.T, teacher.double(), labels=labels, hard_weight=0.5,
                             divergence="reverse_kl")
    assert_close(loss, want, torch.float32, msg="loss")
    loss.backward()
    want.backward()
    assert_close(hidden.grad, h64.grad, torch.float32, msg="grad hidden")
    assert_close(weight.grad, w64.grad, torch.float32, msg="grad weight")
