"""kd_loss: every backend against the float64 reference (losses, student and teacher gradients).

The options are crossed with a pairwise design (every pair of option values appears in at least
one case) rather than the full product, so the Triton interpreter stays within budget. Inputs
are fresh random logits (seeded per test by tests/conftest.py); the reference runs in float64 on
the same values, and losses (fp32) and gradients (input dtype) are compared with
tests/tolerances.py.
"""

from __future__ import annotations

import itertools
import math
import textwrap

import pytest
import torch

from kdengine.ops import BackendUnavailable
from kdengine.ops.kd_loss import kd_loss
from kdengine.reference.kd_loss import DIVERGENCES, kd_loss_reference
from tests.conftest import backend_params, device_for
from tests.ops.triton_compile import check_compiles
from tests.tolerances import assert_close, assert_within_reference_error

# The Triton interpreter evaluates both sides of tl.where with numpy, so masked lanes (−inf
# logits) warn about 0 · inf before the where discards them.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

# ---------------------------------------------------------------------------------------------
# Pairwise design over the options
# ---------------------------------------------------------------------------------------------
FACTORS = {
    # (divergence, jsd_beta): β = 0 / 1 are TRL's forward / reverse KL endpoints
    "divergence": [("forward_kl", 0.5), ("reverse_kl", 0.5), ("soft_ce", 0.5), ("jsd", 0.3), ("jsd", 0.0),
                   ("jsd", 1.0), ("tvd", 0.5), ("mse", 0.5)],
    # (reduction, normalizer): a number, or "tensor" for a 0-d tensor on the device
    "reduce": [("batchmean", None), ("sum", None), ("mean", None), ("none", None), ("batchmean", 3.0),
               ("sum", "tensor"), ("mean", "tensor")],
    "dtype": [torch.float32, torch.bfloat16, torch.float16],
    # prime V in one chunk; V > 65536 (2 rows); one row whose V = 4099 ends in a partial chunk
    "shape": [(5, 1009), (2, 70001), (1, 4099)],
    "temperature": [1.0, 2.5, 0.7],
    # none | some rows ignored | ignored rows + hard-label CE (ignore_index=-1) | int32 labels + CE
    "labels": ["none", "ignored", "hard", "hard_int32"],
    "layout": ["contiguous", "row_strided", "transposed"],
    "masked": [False, True],
    "row_weights": [False, True],
    "grad_output": [1.0, 2.5],
    "grads": ["student", "teacher", "both", "none"],
}


def pairwise(factors: dict[str, list]) -> list[dict]:
    """Greedy all-pairs covering design: each new case starts from the first uncovered pair of
    values and gives every other option the value that covers the most uncovered pairs."""
    names = list(factors)
    sizes = [len(factors[n]) for n in names]
    todo = {(a, i, b, j) for a, b in itertools.combinations(range(len(names)), 2)
            for i in range(sizes[a]) for j in range(sizes[b])}
    cases = []
    while todo:
        a, i, b, j = min(todo)
        row = {a: i, b: j}
        for f in range(len(names)):
            if f not in row:
                row[f] = max(range(sizes[f]), key=lambda lv, f=f, row=row: sum(
                    ((f, lv, g, row[g]) if f < g else (g, row[g], f, lv)) in todo for g in row))
        todo -= {(f, row[f], g, row[g]) for f, g in itertools.combinations(range(len(names)), 2)}
        cases.append({names[f]: factors[names[f]][row[f]] for f in range(len(names))})
    return cases


CASES = pairwise(FACTORS)


def case_id(case: dict) -> str:
    div, beta = case["divergence"]
    red, norm = case["reduce"]
    n, v = case["shape"]
    return "-".join([f"{div}{beta if div == 'jsd' else ''}", red + (f"/{norm}" if norm else ""),
                     str(case["dtype"]).replace("torch.", ""), f"{n}x{v}", f"T{case['temperature']}",
                     case["labels"], case["layout"], "masked" if case["masked"] else "dense",
                     "rw" if case["row_weights"] else "norw", f"go{case['grad_output']}", case["grads"]])


def test_design_covers_every_pair():
    covered = {(a, repr(c[a]), b, repr(c[b])) for c in CASES for a, b in itertools.combinations(FACTORS, 2)}
    for a, b in itertools.combinations(FACTORS, 2):
        for x, y in itertools.product(FACTORS[a], FACTORS[b]):
            assert (a, repr(x), b, repr(y)) in covered, (a, x, b, y)


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------
def masked_columns(v: int) -> torch.Tensor:
    """A padded-vocabulary style mask: the first column, a run in the middle, the last column."""
    mid = v // 2
    return torch.tensor(sorted({0, v - 1, *range(mid, min(mid + 37, v - 1))}))


def make_logits(n: int, v: int, dtype, layout: str, masked: bool, device) -> torch.Tensor:
    """Random logits (σ = 3) in ``dtype`` with the requested memory layout."""
    if layout == "contiguous":
        x = (torch.randn(n, v) * 3).to(dtype)
    elif layout == "row_strided":  # a slice of wider rows: row stride v + 13, column stride 1
        x = (torch.randn(n, v + 13) * 3).to(dtype)[:, 5:5 + v]
    elif layout == "transposed":  # the transpose of a contiguous copy: column stride n
        x = (torch.randn(n, v) * 3).to(dtype).t().contiguous().t()
    else:
        raise ValueError(layout)
    x = x.to(device)
    if masked:
        x[:, masked_columns(v).to(device)] = float("-inf")
    return x


def make_labels(kind: str, n: int, v: int, masked: bool, device):
    """(labels, ignore_index, hard_weight); targets avoid masked columns."""
    if kind == "none":
        return None, -100, 0.0
    allowed = torch.ones(v, dtype=torch.bool)
    if masked:
        allowed[masked_columns(v)] = False
    choices = allowed.nonzero().squeeze(1)
    labels = choices[torch.randint(len(choices), (n,))]
    if kind == "hard_int32":
        return labels.to(torch.int32).to(device), -100, 0.3
    ignore_index = -1 if kind == "hard" else -100
    if n > 1:
        labels[::2] = ignore_index  # rows 0, 2, ...: at least one ignored, at least one kept
    return labels.to(device), ignore_index, (0.7 if kind == "hard" else 0.0)


def run_case(backend: str, case: dict) -> None:
    device = device_for(backend)
    dtype = case["dtype"]
    n, v = case["shape"]
    divergence, beta = case["divergence"]
    reduction, normalizer = case["reduce"]
    student = make_logits(n, v, dtype, case["layout"], case["masked"], device)
    teacher = make_logits(n, v, dtype, case["layout"], case["masked"], device)
    labels, ignore_index, hard_weight = make_labels(case["labels"], n, v, case["masked"], device)
    row_weights = (torch.rand(n) + 0.5).to(device) if case["row_weights"] else None
    norm_arg, norm_ref = normalizer, normalizer
    if normalizer == "tensor":
        value = torch.rand(()) * 10 + 1
        norm_arg, norm_ref = value.to(device), value.double()
    student.requires_grad_(case["grads"] in ("student", "both"))
    teacher.requires_grad_(case["grads"] in ("teacher", "both"))
    options = {"divergence": divergence, "temperature": case["temperature"], "jsd_beta": beta,
               "ignore_index": ignore_index, "hard_weight": hard_weight, "reduction": reduction}

    loss = kd_loss(student, teacher, labels=labels, row_weights=row_weights, normalizer=norm_arg,
                   backend=backend, **options)
    s64 = student.detach().double().requires_grad_(student.requires_grad)
    t64 = teacher.detach().double().requires_grad_(teacher.requires_grad)
    want = kd_loss_reference(s64, t64, labels=labels, normalizer=norm_ref,
                             row_weights=None if row_weights is None else row_weights.double(), **options)
    assert loss.dtype == torch.float32 and loss.shape == want.shape
    assert_close(loss, want, torch.float32, msg="loss")
    if case["grads"] == "none":
        assert loss.grad_fn is None
        return
    grad_output = torch.full(loss.shape, case["grad_output"])
    if reduction == "none" and case["grad_output"] != 1.0:
        grad_output = grad_output * (torch.rand(n) + 0.5)
    loss.backward(grad_output.to(device))
    want.backward(grad_output.double())
    for name, x, x64 in (("student", student, s64), ("teacher", teacher, t64)):
        if x.requires_grad:
            assert x.grad.dtype == dtype and x.grad.shape == x.shape
            assert_close(x.grad, x64.grad, dtype, msg=f"grad {name}")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_reference(backend, case):
    run_case(backend, case)


# ---------------------------------------------------------------------------------------------
# Edge cases
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
@pytest.mark.parametrize("scale", [3.0, 300.0])
def test_all_rows_ignored(backend, divergence, reduction, scale):
    """Ignored rows: exactly zero loss and gradients, also with huge logits (no inf · 0)."""
    device = device_for(backend)
    student = (torch.randn(3, 257, device=device) * scale).requires_grad_()
    teacher = (torch.randn(3, 257, device=device) * scale).requires_grad_()
    labels = torch.full((3,), -100, dtype=torch.long, device=device)
    loss = kd_loss(student, teacher, divergence=divergence, temperature=2.0, labels=labels, hard_weight=0.5,
                   reduction=reduction, backend=backend)
    assert torch.equal(loss.detach().cpu(), torch.zeros(loss.shape))
    loss.backward(torch.full(loss.shape, 3.0, device=device))
    assert torch.equal(student.grad.cpu(), torch.zeros(3, 257))
    assert torch.equal(teacher.grad.cpu(), torch.zeros(3, 257))


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_one_live_column_and_large_logits(backend, divergence):
    """Row 0 keeps one column (one-hot softmax on both sides: D = 0, zero gradients); row 1 has
    logits of magnitude ~1e3 (online softmax rescaling); no NaN anywhere."""
    device = device_for(backend)
    student = torch.randn(2, 300) * 3
    teacher = torch.randn(2, 300) * 3
    student[0, :] = teacher[0, :] = float("-inf")
    student[0, 123], teacher[0, 123] = 2.0, -1.0
    student[1] *= 400
    teacher[1] *= 400
    s = student.to(device).requires_grad_()
    t = teacher.clone().to(device).requires_grad_()
    loss = kd_loss(s, t, divergence=divergence, temperature=1.5, reduction="none", backend=backend)
    s64 = student.detach().double().requires_grad_()
    t64 = teacher.detach().double().requires_grad_()
    want = kd_loss_reference(s64, t64, divergence=divergence, temperature=1.5, reduction="none")
    assert_close(loss, want, torch.float32, msg="row losses")
    if divergence != "mse":
        assert abs(loss[0].item()) <= 1e-6
    weights = torch.tensor([1.0, 0.5])
    loss.backward(weights.to(device))
    want.backward(weights.double())
    assert not torch.isnan(s.grad).any() and not torch.isnan(t.grad).any()
    # one-hot rows: the exact gradients are ~0 left by cancelling O(1) terms (scale=1)
    assert_close(s.grad, s64.grad, torch.float32, msg="grad student", scale=1.0)
    assert_close(t.grad, t64.grad, torch.float32, msg="grad teacher", scale=1.0)


@pytest.mark.parametrize("backend", backend_params("triton", "cuda"), indirect=True)
def test_mixed_input_dtypes(backend):
    """The Triton kernel reads each side in its own dtype (here a bf16 student, an fp32 teacher)."""
    if backend == "cuda":
        pytest.skip("the CUDA backend needs one dtype on both sides (falls under BackendUnavailable)")
    device = device_for(backend)
    student = (torch.randn(3, 1031) * 3).to(torch.bfloat16).to(device).requires_grad_()
    teacher = (torch.randn(3, 1031) * 3).to(device).requires_grad_()
    loss = kd_loss(student, teacher, divergence="jsd", jsd_beta=0.4, temperature=1.3, backend=backend)
    s64 = student.detach().double().requires_grad_()
    t64 = teacher.detach().double().requires_grad_()
    want = kd_loss_reference(s64, t64, divergence="jsd", jsd_beta=0.4, temperature=1.3)
    assert_close(loss, want, torch.float32, msg="loss")
    loss.backward()
    want.backward()
    assert_close(student.grad, s64.grad, torch.bfloat16, msg="grad student")
    assert_close(teacher.grad, t64.grad, torch.float32, msg="grad teacher")


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_low_precision_beats_plain_pytorch(backend, divergence):
    """bf16 logits: the backend's loss and gradient are within 2× the error of plain PyTorch
    computing the same loss in bf16 (fp32 accumulation should make them far better)."""
    device = device_for(backend)
    student = (torch.randn(4, 2053) * 3).to(torch.bfloat16)
    teacher = (torch.randn(4, 2053) * 3).to(torch.bfloat16)
    options = {"divergence": divergence, "temperature": 2.0, "reduction": "batchmean"}
    s = student.clone().to(device).requires_grad_()
    loss = kd_loss(s, teacher.to(device), backend=backend, **options)
    loss.backward()
    s64 = student.double().requires_grad_()
    truth = kd_loss_reference(s64, teacher.double(), **options)
    truth.backward()
    s16 = student.clone().requires_grad_()
    plain = kd_loss_reference(s16, teacher, **options)
    plain.backward()
    assert_within_reference_error(loss, truth, plain, msg="loss")
    assert_within_reference_error(s.grad, s64.grad, s16.grad, msg="grad student")


def test_backward_can_run_twice(backend):
    """Recompute-in-backward: a retained graph's backward gives the same gradients again."""
    device = device_for(backend)
    student = torch.randn(3, 257, device=device, requires_grad=True)
    loss = kd_loss(student, torch.randn(3, 257, device=device), divergence="jsd", backend=backend)
    loss.backward(retain_graph=True)
    first = student.grad.clone()
    student.grad = None
    loss.backward()
    assert torch.equal(student.grad, first)


def peaked_logits(n: int, v: int, peak: float) -> torch.Tensor:
    """Rows with one dominant logit (``peak`` above σ=1 noise) at a random column per row."""
    x = torch.randn(n, v)
    x[torch.arange(n), torch.randint(v, (n,))] = peak
    return x


@pytest.mark.parametrize("teacher_peak", [17.0, 23.0])
def test_tvd_peaked_rows_exact(backend, teacher_peak):
    """TVD in peaked rows: Σ q g ≈ −½ + δ with δ ~ 1e-6, so q (Σ q g − g) cancels unless the two sides
    (p > q, p < q) are summed apart. Both gradients must match float64 to fp32 accuracy."""
    device = device_for(backend)
    student = peaked_logits(4, 1531, 20.0)
    teacher = student.clone()
    teacher[student == 20.0] = teacher_peak  # same peak column, less (17) or more (23) confident
    teacher[:, :700] += 0.3 * torch.randn(4, 700)
    s = student.to(device).requires_grad_()
    t = teacher.to(device).requires_grad_()
    loss = kd_loss(s, t, divergence="tvd", reduction="sum", backend=backend)
    s64 = student.detach().double().requires_grad_()
    t64 = teacher.detach().double().requires_grad_()
    want = kd_loss_reference(s64, t64, divergence="tvd", reduction="sum")
    assert_close(loss, want, torch.float32, msg="loss")
    loss.backward(torch.tensor(3.0, device=device))
    want.backward(torch.tensor(3.0, dtype=torch.float64))
    for row in range(4):  # row-relative: each row's gradients are as small as its δ
        assert_close(s.grad[row], s64.grad[row], torch.float32, msg=f"grad student row {row}")
        assert_close(t.grad[row], t64.grad[row], torch.float32, msg=f"grad teacher row {row}")


@pytest.mark.parametrize("divergence", ["forward_kl", "tvd", "mse"])
def test_out_of_range_label_gives_nan_row(backend, divergence):
    """A hard label outside [0, V) (not ignore_index): that row's loss and student gradient are NaN
    on every backend (never a finite loss); the other rows are unaffected."""
    device = device_for(backend)
    v = 300
    student = (torch.randn(4, v) * 3).to(device).requires_grad_()
    teacher = (torch.randn(4, v) * 3).to(device)
    labels = torch.tensor([5, v, -100, -7], device=device)  # row 1: = V, row 3: negative
    loss = kd_loss(student, teacher, divergence=divergence, temperature=1.5, labels=labels, hard_weight=0.5,
                   reduction="none", backend=backend)
    rows = loss.detach().cpu()
    assert torch.isnan(rows[1]) and torch.isnan(rows[3])
    assert torch.isfinite(rows[0]) and rows[2] == 0
    loss.backward(torch.ones(4, device=device))
    grad = student.grad.cpu()
    assert torch.isnan(grad[1]).all() and torch.isnan(grad[3]).all()
    assert torch.isfinite(grad[0]).all() and torch.equal(grad[2], torch.zeros(v))
    reduced = kd_loss(student, teacher, divergence=divergence, labels=labels, hard_weight=0.5, backend=backend)
    assert torch.isnan(reduced)


def nonfinite_rows_case(n_rows: int, v: int, dtype, side: str, device):
    """Logits [n_rows, v] (student and teacher, −inf masked columns in every row) whose row 1 holds a
    NaN and row 2 a +inf on ``side``; the last row, also with a NaN, is ignored by its label."""
    student, teacher = (make_logits(n_rows, v, dtype, "contiguous", True, device) for _ in range(2))
    bad = student if side == "student" else teacher
    bad[1, 7] = math.nan
    bad[2, v - 3] = math.inf
    bad[n_rows - 1, 11] = math.nan
    labels = torch.tensor([3, 5, 9] + [-100] * (n_rows - 3), device=device)
    return student, teacher, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
@pytest.mark.parametrize("side", ["student", "teacher"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_nonfinite_logit_gives_nan_row(backend, divergence, side, dtype):
    """Only −inf means a masked column: a NaN or +inf logit in the student or the teacher makes its
    row's loss and both its gradient rows NaN on every backend (the `> −inf` masks alone read NaN
    as masked: loss 0, gradient 0), so a reduced loss is NaN; the clean row matches float64 and an
    ignored row stays exactly 0."""
    if dtype == torch.float64 and backend != "torch":
        pytest.skip("float64 runs on the torch backend only")
    device = device_for(backend)
    v = 1009
    student, teacher, labels = nonfinite_rows_case(4, v, dtype, side, device)
    options = {"divergence": divergence, "temperature": 1.5, "labels": labels, "hard_weight": 0.4}
    s, t = student.clone().requires_grad_(), teacher.clone().requires_grad_()
    loss = kd_loss(s, t, reduction="none", backend=backend, **options)
    grad_output = torch.rand(4) + 0.5
    loss.backward(grad_output.to(device))
    s64, t64 = student.double().requires_grad_(), teacher.double().requires_grad_()
    want = kd_loss_reference(s64, t64, reduction="none", **options)
    want.backward(grad_output.double())
    rows = loss.detach().cpu()
    assert torch.isnan(rows[1:3]).all() and rows[3] == 0, rows
    assert_close(rows[:1], want[:1], torch.float32, msg="clean row")
    for name, x, x64 in (("student", s, s64), ("teacher", t, t64)):
        grad = x.grad.cpu()
        assert torch.isnan(grad[1:3]).all(), f"{name} gradient of a broken row is not all NaN"
        assert torch.equal(grad[3], torch.zeros(v, dtype=dtype)), f"{name} gradient of the ignored row"
        assert_close(grad[:1], x64.grad[:1], dtype, msg=f"{name} gradient of the clean row")
    assert torch.isnan(kd_loss(student, teacher, backend=backend, **options))


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "tvd"])
def test_fp16_grad_scaler_gradients_exact(backend, divergence):
    """fp16 with a GradScaler: batchmean over 16384 rows (here the normalizer) and loss scale 65536.
    The gradient is computed in fp32 with grad_output in and rounded once, so it matches float64 to
    fp16 accuracy (rounding before the scale flushed most of it to zero)."""
    device = device_for(backend)
    student = (torch.randn(6, 2053) * 3).half()
    teacher = (torch.randn(6, 2053) * 3).half()
    options = {"divergence": divergence, "temperature": 2.0, "normalizer": 16384.0}
    s = student.to(device).requires_grad_()
    loss = kd_loss(s, teacher.to(device), backend=backend, **options)
    loss.backward(torch.tensor(65536.0, device=device))
    s64 = student.detach().double().requires_grad_()
    kd_loss_reference(s64, teacher.double(), **options).backward(torch.tensor(65536.0, dtype=torch.float64))
    assert (s.grad == 0).float().mean() < 0.01
    assert_close(s.grad, s64.grad, torch.float16, msg="fp16 grad student under loss scaling")


def test_gradcheck_torch_float64():
    student = torch.randn(3, 11, dtype=torch.float64) * 2
    teacher = torch.randn(3, 11, dtype=torch.float64) * 2
    student[:, 4] = teacher[:, 4] = float("-inf")
    labels = torch.tensor([2, -100, 7])
    row_weights = torch.tensor([0.5, 2.0, 1.5], dtype=torch.float64)
    for divergence, beta in [*((d, 0.5) for d in DIVERGENCES), ("jsd", 0.0), ("jsd", 1.0)]:
        def fn(s, t, divergence=divergence, beta=beta):
            return kd_loss(s, t, divergence=divergence, jsd_beta=beta, temperature=1.7, labels=labels,
                           hard_weight=0.4, row_weights=row_weights, reduction="none", backend="torch")

        inputs = (student.clone().requires_grad_(), teacher.clone().requires_grad_())
        assert torch.autograd.gradcheck(fn, inputs), divergence


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_agrees_with_trl_generalized_jsd(backend, beta, temperature):
    trl = pytest.importorskip("trl")
    gkd = getattr(trl, "GKDTrainer", None)
    if gkd is None:
        gkd = pytest.importorskip("trl.experimental.gkd").GKDTrainer
    device = device_for(backend)
    student = torch.randn(1, 6, 509, device=device) * 3
    teacher = torch.randn(1, 6, 509, device=device) * 3
    labels = torch.randint(509, (1, 6), device=device)
    labels[0, 1] = -100
    want = gkd.generalized_jsd_loss(student, teacher, labels=labels, beta=beta, temperature=temperature)
    got = kd_loss(student[0], teacher[0], divergence="jsd", jsd_beta=beta, temperature=temperature,
                  t2_scale=False, labels=labels[0], reduction="batchmean", backend=backend)
    assert_close(got, want.double(), torch.float32, msg=f"TRL generalized_jsd_loss β={beta}")


# ---------------------------------------------------------------------------------------------
# Validation: each bad input gets a ValueError saying what was wrong
# ---------------------------------------------------------------------------------------------
def _bad(**overrides):
    args = {"student_logits": torch.randn(4, 10), "teacher_logits": torch.randn(4, 10)}
    args.update(overrides)
    return args


@pytest.mark.parametrize("args, match", [
    (_bad(teacher_logits=torch.randn(3, 10)), r"row mismatch.*N=4.*N=3"),
    (_bad(teacher_logits=torch.randn(4, 12)), r"vocabulary mismatch.*V=10.*V=12"),
    (_bad(student_logits=torch.randn(4, 10, 2)), r"must be 2-D \[N, V\]"),
    (_bad(student_logits=torch.randint(0, 5, (4, 10))), r"student_logits must be a floating tensor"),
    (_bad(teacher_logits=torch.zeros(4, 10, dtype=torch.bool)), r"teacher_logits must be a floating tensor"),
    (_bad(temperature=0.0), r"temperature must be > 0"),
    (_bad(temperature=-1.5), r"temperature must be > 0"),
    (_bad(divergence="jsd", jsd_beta=1.5), r"jsd_beta must be <= 1"),
    (_bad(divergence="jsd", jsd_beta=-0.1), r"jsd_beta must be >= 0"),
    (_bad(divergence="kl"),
     r"unknown divergence 'kl'; expected one of forward_kl, reverse_kl, soft_ce, jsd, tvd, mse"),
    (_bad(reduction="avg"), r"unknown reduction 'avg'; expected one of batchmean, sum, mean, none"),
    (_bad(labels=torch.zeros(3, dtype=torch.long)), r"labels must have shape \[N\]=\[4\], got \(3,\)"),
    (_bad(labels=torch.zeros(4)), r"labels must be an integer tensor"),
    (_bad(reduction="none", normalizer=2.0), r"normalizer .* cannot be used with reduction='none'"),
    (_bad(normalizer=0.0), r"normalizer must be > 0"),
    (_bad(hard_weight=1.0), r"hard_weight != 0 needs labels"),
    (_bad(row_weights=torch.ones(5)), r"row_weights must have shape \[N\]=\[4\]"),
    (_bad(student_logits=torch.randn(4, 0), teacher_logits=torch.randn(4, 0)), r"student_logits has V=0 columns"),
    (_bad(kd_weight=-0.5), r"kd_weight must be >= 0, got -0.5"),
    (_bad(hard_weight=-1.0, labels=torch.zeros(4, dtype=torch.long)), r"hard_weight must be >= 0, got -1.0"),
])
def test_validation_errors(args, match):
    with pytest.raises(ValueError, match=match):
        kd_loss(**args)


def test_float64_is_torch_only():
    student, teacher = torch.randn(2, 8, dtype=torch.float64), torch.randn(2, 8, dtype=torch.float64)
    with pytest.raises(BackendUnavailable, match="triton"):
        kd_loss(student, teacher, backend="triton")
    assert kd_loss(student, teacher).dtype == torch.float64  # auto: the torch backend


# ---------------------------------------------------------------------------------------------
# The Triton kernel compiles for the GPU target (the interpreter does not check that)
# ---------------------------------------------------------------------------------------------
_COMPILE_SCRIPT = textwrap.dedent("""
    import itertools, triton
    from triton.backends.compiler import GPUTarget
    from kdengine.kernels import kd_loss as k
    if "nvidia" not in triton.backends.backends:
        print("SKIP: this triton has no NVIDIA backend"); raise SystemExit(0)
    flags = ["KIND", "HARD", "OWN_T1", "HAS_LABELS", "HAS_WEIGHTS", "GRAD_S", "GRAD_T", "BLOCK"]
    block, warps = k.launch_config(70001)
    for kernel, kind, dtype, full in itertools.product([k._kd_loss_fwd_kernel, k._kd_loss_bwd_kernel], range(6),
                                                       ["bf16", "fp32"], [True, False]):
        pointer = {"s_ptr": dtype, "t_ptr": dtype, "labels_ptr": "i64", "weights_ptr": "fp32",
                   "scale_ptr": "fp32", "stats_ptr": "fp32", "loss_ptr": "fp32", "gs_ptr": dtype, "gt_ptr": dtype}
        scalar = {"V": "i32", "stride_s": "i64", "stride_t": "i64", "stride_scale": "i32", "ignore_index": "i32"}
        names = kernel.arg_names
        sig = {n: "*" + pointer[n] if n in pointer else scalar.get(n, "constexpr" if n in flags else "fp32")
               for n in names}
        consts = {f: (block if f == "BLOCK" else kind if f == "KIND" else full) for f in flags if f in names}
        src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=consts)
        out = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
        assert out.asm.get("cubin"), (kernel, kind, dtype, full)
    print("OK")
""")



@pytest.mark.triton
def test_triton_kernel_compiles_for_sm90():
    check_compiles(_COMPILE_SCRIPT)

