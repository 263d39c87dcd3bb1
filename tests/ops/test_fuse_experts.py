"""fuse_experts / fused_experts_kd_loss: every backend against the float64 reference.

Fresh random inputs (experts at different scales, so α is far from uniform). A pairwise design over
weighting × space × K ∈ {1, 2, 4, 8} × dtype (fp32/bf16/fp16) × −inf masked columns × given
weights ([K], [K] with a zero, [N, K]) × divergence × reduction, with student and expert gradients,
grad_output != 1, labels with an ignored row, hard-label CE, row weights, non-contiguous inputs, one
row, prime V and V > 65536. Plus the identity with kd_loss(s, T · fused_log_probs, temperature=T) on
the torch backend, and the ValueErrors. Backends that cannot run here are skipped with their reason.
"""

from __future__ import annotations

import importlib
import math
import textwrap

import pytest
import torch

from kdengine.ops import _backends
from kdengine.ops.fuse_experts import fuse_experts, fused_experts_kd_loss
from kdengine.ops.kd_loss import kd_loss
from kdengine.reference.fuse_experts import fuse_experts_reference, fused_experts_kd_loss_reference
from kdengine.reference.kd_loss import DIVERGENCES
from tests.conftest import device_for, require_backend
from tests.ops.triton_compile import check_compiles
from tests.tolerances import assert_close

# The Triton interpreter evaluates both sides of tl.where with numpy; the discarded lanes (masked
# columns, padded experts) warn. Real NaN/inf in results are caught by the assertions below.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:divide by zero encountered:RuntimeWarning")

FP32, BF16, FP16 = torch.float32, torch.bfloat16, torch.float16
IGNORE = -100


def make_logits(k, n, v, dtype, *, masked, seed, device, noncontig=False):
    """Experts [K, N, V] at scales 0.5·3, 1.5·3, ... and a student [N, V]; masked columns are −inf in
    all of them. noncontig: experts as a view of [N, K, V] storage, student with a row stride > V."""
    gen = torch.Generator().manual_seed(seed)
    scale = (torch.arange(k, dtype=torch.float32) + 0.5).view(k, 1, 1) * 3.0
    experts = torch.randn(k, n, v, generator=gen) * scale
    student = torch.randn(n, v, generator=gen) * 2.0
    if masked:
        cols = [1, v - 1]
        experts[:, :, cols] = -math.inf
        student[:, cols] = -math.inf
    experts, student = experts.to(dtype), student.to(dtype)
    if noncontig:
        experts = experts.transpose(0, 1).contiguous().transpose(0, 1)
        wide = torch.zeros(n, v + 3, dtype=dtype)
        wide[:, :v] = student
        student = wide[:, :v]
    return experts.to(device), student.to(device)


def make_weights(kind, k, n, *, seed, device):
    gen = torch.Generator().manual_seed(seed + 1)
    if kind is None:
        return None
    if kind == "K":
        return (torch.rand(k, generator=gen) + 0.1).to(device)
    if kind == "K0":  # one expert switched off: α_k = 0 must not turn −inf columns into NaN
        w = torch.rand(k, generator=gen) + 0.1
        w[0] = 0.0
        return w.to(device)
    return torch.softmax(torch.randn(n, k, generator=gen), dim=-1).to(device)  # "NK": a selector


def finite_part_close(actual, expected, dtype, msg):
    """−inf exactly where the reference has it, and close elsewhere."""
    assert torch.equal(actual == -math.inf, expected == -math.inf), f"{msg}: −inf pattern differs"
    keep = expected > -math.inf
    assert torch.isfinite(actual[keep]).all(), f"{msg}: non-finite values"
    assert_close(actual[keep], expected[keep], dtype, msg)


# Pairwise design: every weighting × space, every K × dtype, masks, weights, divergences, reductions.
KD_CASES = [
    dict(k=1, weighting="entropy", space="logit", dtype=FP32, masked=True, divergence="forward_kl",
         reduction="batchmean", grad_experts=True),
    dict(k=2, weighting="uniform", space="prob", dtype=BF16, masked=False, weights="K",
         divergence="reverse_kl", reduction="sum", grad_experts=True, noncontig=True),
    dict(k=4, weighting="confidence", space="logit", dtype=FP16, masked=True, divergence="jsd", jsd_beta=0.3,
         reduction="mean", grad_experts=False, labels=True),
    dict(k=8, weighting="entropy", space="prob", dtype=FP32, masked=True, weights="NK", divergence="soft_ce",
         reduction="none", grad_experts=True, labels=True, hard_weight=0.5),
    dict(k=4, weighting="entropy", space="prob", dtype=BF16, masked=True, divergence="forward_kl",
         reduction="batchmean", grad_experts=True, temperature=2.0, sharpness=0.5, row_weights=True),
    dict(k=2, weighting="confidence", space="prob", dtype=FP32, masked=False, divergence="tvd",
         reduction="sum", grad_experts=True, row_weights=True, noncontig=True),
    dict(k=8, weighting="uniform", space="logit", dtype=FP16, masked=True, weights="K0",
         divergence="forward_kl", reduction="batchmean", grad_experts=True, temperature=1.5),
    dict(k=1, weighting="confidence", space="prob", dtype=BF16, masked=True, divergence="mse",
         reduction="batchmean", grad_experts=True, labels=True),
    dict(k=4, weighting="uniform", space="logit", dtype=FP32, masked=False, weights="NK", divergence="mse",
         reduction="sum", grad_experts=True, temperature=0.5, labels=True, hard_weight=0.3),
    dict(k=2, weighting="entropy", space="logit", dtype=FP16, masked=True, divergence="reverse_kl",
         reduction="none", grad_experts=False, n=1),
    dict(k=8, weighting="confidence", space="logit", dtype=BF16, masked=True, divergence="tvd",
         reduction="batchmean", grad_experts=True, labels=True),
    dict(k=1, weighting="uniform", space="prob", dtype=FP16, masked=False, weights="K", divergence="jsd",
         reduction="sum", grad_experts=True, temperature=2.0),
    dict(k=4, weighting="entropy", space="logit", dtype=FP32, masked=True, weights="K0", divergence="jsd",
         reduction="batchmean", grad_experts=True, sharpness=3.0),
    dict(k=8, weighting="entropy", space="prob", dtype=FP16, masked=True, divergence="reverse_kl",
         reduction="mean", grad_experts=True, weights="K0"),
    # several V chunks per row in the kernels (online rescaling), then V > 65536 (prime) in one row
    dict(k=8, weighting="entropy", space="logit", dtype=BF16, masked=True, divergence="forward_kl",
         reduction="sum", grad_experts=True, n=2, v=1031),
    dict(k=2, weighting="entropy", space="prob", dtype=FP32, masked=True, divergence="forward_kl",
         reduction="batchmean", grad_experts=True, n=1, v=65537),
]


def _case_id(case):
    parts = [f"{key}={val}" for key, val in case.items() if key != "dtype"]
    return "-".join([*parts, str(case["dtype"]).replace("torch.", "")])


@pytest.mark.parametrize("case", KD_CASES, ids=[_case_id(c) for c in KD_CASES])
def test_fused_experts_kd_loss_matches_reference(backend, case):
    case = dict(case)
    k, n, v, dtype = case.pop("k"), case.pop("n", 3), case.pop("v", 37), case.pop("dtype")
    device = device_for(backend)
    seed = 7 * k + v
    experts, student = make_logits(k, n, v, dtype, masked=case.pop("masked"), seed=seed, device=device,
                                   noncontig=case.pop("noncontig", False))
    weights = make_weights(case.pop("weights", None), k, n, seed=seed, device=device)
    grad_experts = case.pop("grad_experts")
    gen = torch.Generator().manual_seed(seed + 2)
    opts = dict(weighting=case.pop("weighting"), space=case.pop("space"), divergence=case.pop("divergence"),
                reduction=case.pop("reduction"), temperature=case.pop("temperature", 1.0),
                sharpness=case.pop("sharpness", 1.0), jsd_beta=case.pop("jsd_beta", 0.5),
                hard_weight=case.pop("hard_weight", 0.0))
    if case.pop("labels", False):
        labels = torch.randint(2, v - 1, (n,), generator=gen)  # never a masked column
        labels[0] = IGNORE
        opts["labels"] = labels.to(device)
    if case.pop("row_weights", False):
        opts["row_weights"] = (torch.rand(n, generator=gen) + 0.5).to(device)
    assert not case, f"unused case keys {case}"

    s = student.detach().requires_grad_(True)
    z = experts.detach().requires_grad_(grad_experts)
    loss = fused_experts_kd_loss(s, z, weights=weights, backend=backend, **opts)
    s64 = student.detach().cpu().double().requires_grad_(True)
    z64 = experts.detach().cpu().double().requires_grad_(grad_experts)
    cpu_opts = {key: (val.cpu() if isinstance(val, torch.Tensor) else val) for key, val in opts.items()}
    expected = fused_experts_kd_loss_reference(s64, z64, weights=None if weights is None else weights.cpu(),
                                               **cpu_opts)
    assert loss.dtype == torch.float32
    assert_close(loss.cpu(), expected.detach(), FP32, "loss")

    grad_out = (torch.rand(n, generator=gen) + 0.5) if opts["reduction"] == "none" else torch.tensor(1.7)
    loss.backward(grad_out.to(device))
    expected.backward(grad_out.double())
    assert s.grad.dtype == dtype and torch.isfinite(s.grad).all()
    assert_close(s.grad.cpu(), s64.grad, dtype, "student grad")
    if grad_experts:
        assert z.grad.dtype == dtype and torch.isfinite(z.grad).all()
        assert_close(z.grad.cpu(), z64.grad, dtype, "expert grad")


FUSE_CASES = [
    dict(k=1, weighting="uniform", space="logit", dtype=BF16, masked=True),
    dict(k=2, weighting="entropy", space="prob", dtype=FP32, masked=True, weights="NK"),
    dict(k=4, weighting="confidence", space="prob", dtype=FP16, masked=False, temperature=2.0),
    dict(k=8, weighting="entropy", space="logit", dtype=FP32, masked=True, sharpness=0.5, noncontig=True),
    dict(k=2, weighting="confidence", space="logit", dtype=BF16, masked=False, weights="K"),
    dict(k=4, weighting="uniform", space="prob", dtype=FP32, masked=True, weights="K0"),
    dict(k=8, weighting="confidence", space="prob", dtype=BF16, masked=True),
    dict(k=1, weighting="entropy", space="prob", dtype=FP16, masked=True, temperature=0.7),
    dict(k=4, weighting="entropy", space="prob", dtype=FP32, masked=True, v=2053),  # several V chunks
]


@pytest.mark.parametrize("case", FUSE_CASES, ids=[_case_id(c) for c in FUSE_CASES])
def test_fuse_experts_matches_reference(backend, case):
    case = dict(case)
    k, n, v, dtype = case.pop("k"), 3, case.pop("v", 41), case.pop("dtype")
    device = device_for(backend)
    seed = 11 * k
    experts, _ = make_logits(k, n, v, dtype, masked=case.pop("masked"), seed=seed, device=device)
    if case.pop("noncontig", False):  # column stride != 1
        experts = experts.transpose(1, 2).contiguous().transpose(1, 2)
    weights = make_weights(case.pop("weights", None), k, n, seed=seed, device=device)
    opts = dict(weighting=case.pop("weighting"), space=case.pop("space"),
                temperature=case.pop("temperature", 1.0), sharpness=case.pop("sharpness", 1.0))
    assert not case

    z = experts.detach().requires_grad_(True)
    log_probs, alpha, entropy = fuse_experts(z, weights=weights, backend=backend, **opts)
    z64 = experts.detach().cpu().double().requires_grad_(True)
    ref_weights = None if weights is None else weights.cpu()
    exp_lp, exp_alpha, exp_ent = fuse_experts_reference(z64, weights=ref_weights, **opts)
    assert log_probs.dtype == alpha.dtype == entropy.dtype == torch.float32
    assert not alpha.requires_grad and not entropy.requires_grad
    finite_part_close(log_probs.detach().cpu(), exp_lp.detach(), FP32, "log_probs")
    assert_close(alpha.cpu(), exp_alpha, FP32, "alpha")
    assert_close(entropy.cpu(), exp_ent, FP32, "entropy")

    grad_out = torch.randn(n, v, generator=torch.Generator().manual_seed(seed))
    log_probs.backward(grad_out.to(device))
    exp_lp.backward(grad_out.double())
    assert z.grad.dtype == dtype and torch.isfinite(z.grad).all()
    assert_close(z.grad.cpu(), z64.grad, dtype, "expert grad")


@pytest.mark.parametrize("space", ["logit", "prob"])
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "mse"])
def test_equals_kd_loss_of_fused_teacher(space, divergence):
    """fused_experts_kd_loss(s, z, T) == kd_loss(s, T · fuse_experts(z)[0], temperature=T), with grads."""
    experts, student = make_logits(4, 5, 29, FP32, masked=True, seed=3, device="cpu")
    labels = torch.tensor([3, IGNORE, 5, 7, 2])
    opts = dict(temperature=1.5, labels=labels, hard_weight=0.2, divergence=divergence, reduction="batchmean")
    s1, z1 = student.clone().requires_grad_(True), experts.clone().requires_grad_(True)
    fused = fused_experts_kd_loss(s1, z1, weighting="entropy", space=space, backend="torch", **opts)
    fused.backward()
    s2, z2 = student.clone().requires_grad_(True), experts.clone().requires_grad_(True)
    log_probs, _, _ = fuse_experts(z2, weighting="entropy", space=space, temperature=1.5, backend="torch")
    composed = kd_loss(s2, 1.5 * log_probs, backend="torch", **opts)
    composed.backward()
    assert_close(fused.detach(), composed.detach(), FP32, "loss")
    assert_close(s1.grad, s2.grad, FP32, "student grad")
    assert_close(z1.grad, z2.grad, FP32, "expert grad")


def test_torch_backend_chunks_rows(monkeypatch):
    """Several chunks (one row each) give the unchunked result, forward and backward."""
    module = importlib.import_module("kdengine.ops.fuse_experts")

    experts, student = make_logits(3, 4, 23, FP32, masked=True, seed=5, device="cpu")
    results = []
    for elements in (module.TORCH_CHUNK_ELEMENTS, 1):
        monkeypatch.setattr(module, "TORCH_CHUNK_ELEMENTS", elements)
        s, z = student.clone().requires_grad_(True), experts.clone().requires_grad_(True)
        loss = fused_experts_kd_loss(s, z, space="prob", backend="torch")
        loss.backward()
        lp, _, _ = fuse_experts(z.detach(), space="prob", backend="torch")
        results.append((loss.detach(), s.grad, z.grad, lp))
    for name, a, b in zip(("loss", "student grad", "expert grad", "log_probs"), *results):
        finite_part_close(a, b, FP32, name)


@pytest.mark.parametrize("space", ["logit", "prob"])
def test_tvd_peaked_rows_exact(backend, space):
    """TVD against a peaked fused teacher: the student and expert gradients sum the two sides of
    p̄ > q and p̄ < q apart (no q (Σ q g − g) cancellation) and match float64 to fp32 accuracy."""
    device = device_for(backend)
    n, v = 3, 1031
    student = torch.randn(n, v)
    peak = torch.randint(v, (n,))
    student[torch.arange(n), peak] = 20.0
    experts = student.expand(2, n, v).clone()
    experts[0, torch.arange(n), peak] = 17.0  # less confident than the student
    experts[1, torch.arange(n), peak] = 22.0  # more confident
    experts[:, :, :400] += 0.3 * torch.randn(2, n, 400)
    s = student.to(device).requires_grad_()
    z = experts.to(device).requires_grad_()
    opts = dict(divergence="tvd", space=space, weighting="uniform", reduction="sum")
    loss = fused_experts_kd_loss(s, z, backend=backend, **opts)
    s64 = student.detach().double().requires_grad_()
    z64 = experts.detach().double().requires_grad_()
    want = fused_experts_kd_loss_reference(s64, z64, **opts)
    assert_close(loss.cpu(), want.detach(), FP32, "loss")
    loss.backward(torch.tensor(2.0, device=device))
    want.backward(torch.tensor(2.0, dtype=torch.float64))
    for row in range(n):  # row-relative: a row's gradients are as small as its δ
        assert_close(s.grad[row].cpu(), s64.grad[row], FP32, f"student grad row {row}")
        assert_close(z.grad[:, row].cpu(), z64.grad[:, row], FP32, f"expert grad row {row}")


def test_out_of_range_label_gives_nan_row(backend):
    """A hard label outside [0, V) that is not ignore_index: NaN row loss and student gradient."""
    device = device_for(backend)
    experts, student = make_logits(2, 3, 29, FP32, masked=False, seed=3, device=device)
    s = student.requires_grad_(True)
    labels = torch.tensor([4, 29, IGNORE], device=device)
    loss = fused_experts_kd_loss(s, experts, labels=labels, hard_weight=0.5, reduction="none", backend=backend)
    rows = loss.detach().cpu()
    assert torch.isfinite(rows[0]) and torch.isnan(rows[1]) and rows[2] == 0
    loss.backward(torch.ones(3, device=device))
    grad = s.grad.cpu()
    assert torch.isfinite(grad[0]).all() and torch.isnan(grad[1]).all() and torch.equal(grad[2], torch.zeros(29))


def _broken_rows(v: int, dtype, device):
    """Experts [3, 5, V] and student [5, V] (−inf masked columns in all) with row 1: NaN in expert 1,
    row 2: +inf in expert 0, row 3: NaN in the student, row 4 (ignored by its label): NaN in expert 2."""
    experts, student = make_logits(3, 5, v, dtype, masked=True, seed=5, device=device)
    experts[1, 1, 4] = math.nan
    experts[0, 2, v - 3] = math.inf
    student[3, 6] = math.nan
    experts[2, 4, 8] = math.nan
    return experts, student, torch.tensor([2, 3, 5, 7, IGNORE], device=device)


FUSIONS = {"uniform": {"weighting": "uniform"}, "entropy": {"weighting": "entropy", "sharpness": 0.7},
           "zero_weight": {"weights": torch.tensor([0.5, 0.0, 0.5])}}  # row 1's NaN expert has α = 0


@pytest.mark.parametrize("fusion", list(FUSIONS))
@pytest.mark.parametrize("space", ["logit", "prob"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_nonfinite_logit_gives_nan_row(backend, divergence, space, fusion):
    """Only −inf means masked: a NaN or +inf logit in any expert (α_k = 0 included) or in the student
    makes the row's loss, student gradient and every expert's gradient NaN on every backend; the
    clean row matches float64 and the ignored row stays exactly 0."""
    device = device_for(backend)
    v = 61
    experts, student, labels = _broken_rows(v, FP32, device)
    options = {"divergence": divergence, "space": space, "temperature": 1.5, "labels": labels, "hard_weight": 0.3,
               **{k: (w.to(device) if isinstance(w, torch.Tensor) else w) for k, w in FUSIONS[fusion].items()}}
    s, z = student.clone().requires_grad_(), experts.clone().requires_grad_()
    loss = fused_experts_kd_loss(s, z, reduction="none", backend=backend, **options)
    grad_output = torch.rand(5) + 0.5
    loss.backward(grad_output.to(device))
    s64, z64 = student.double().cpu().requires_grad_(), experts.double().cpu().requires_grad_()
    ref_options = {**options, "labels": labels.cpu()}
    if "weights" in options:
        ref_options["weights"] = options["weights"].double().cpu()
    want = fused_experts_kd_loss_reference(s64, z64, reduction="none", **ref_options)
    want.backward(grad_output.double())
    rows = loss.detach().cpu()
    assert torch.isnan(rows[1:4]).all() and rows[4] == 0, rows
    assert_close(rows[:1], want[:1], FP32, "clean row")
    for name, grad, grad64 in (("student", s.grad.cpu(), s64.grad), ("experts", z.grad.cpu().transpose(0, 1),
                                                                      z64.grad.transpose(0, 1))):
        assert torch.isnan(grad[1:4]).all(), f"{name} gradient of a broken row is not all NaN"
        assert torch.equal(grad[4], torch.zeros_like(grad[4])), f"{name} gradient of the ignored row"
        assert_close(grad[:1], grad64[:1], FP32, f"{name} gradient of the clean row")
    assert torch.isnan(fused_experts_kd_loss(student, experts, backend=backend, **options))


@pytest.mark.parametrize("space", ["logit", "prob"])
def test_fuse_experts_nonfinite_logit_gives_nan_row(backend, space):
    """fuse_experts: a NaN or +inf logit in any expert makes that row's fused log-probs NaN."""
    device = device_for(backend)
    experts, _, _ = _broken_rows(61, FP32, device)
    log_probs, _, _ = fuse_experts(experts, space=space, weights=FUSIONS["zero_weight"]["weights"].to(device),
                                   backend=backend)
    rows = torch.isnan(log_probs.cpu()).all(-1)
    assert rows.tolist() == [False, True, True, False, True]


def test_triton_backward_recomputes():
    """Triton recomputes in backward: a retained graph's backward gives the same gradients again."""
    require_backend("triton")
    experts, student = make_logits(2, 2, 17, FP32, masked=False, seed=1, device=device_for("triton"))
    s = student.requires_grad_(True)
    z = experts.requires_grad_(True)
    loss = fused_experts_kd_loss(s, z, divergence="jsd", space="prob", backend="triton")
    loss.backward(retain_graph=True)
    first = (s.grad.clone(), z.grad.clone())
    s.grad = z.grad = None
    loss.backward()
    assert torch.equal(s.grad, first[0]) and torch.equal(z.grad, first[1])


@pytest.mark.parametrize("space", ["logit", "prob"])
@pytest.mark.parametrize("weighting", ["entropy", "uniform"])
def test_fp16_grad_scaler_gradients_exact(backend, space, weighting):
    """fp16 with a GradScaler (batchmean over 16384 rows, scale 65536): student and expert gradients
    match float64 to fp16 accuracy (scaled in fp32 before their one rounding)."""
    device = device_for(backend)
    experts, student = make_logits(2, 4, 523, FP16, masked=False, seed=5, device=device)
    s = student.requires_grad_(True)
    z = experts.requires_grad_(True)
    opts = dict(space=space, weighting=weighting, temperature=2.0, normalizer=16384.0)
    fused_experts_kd_loss(s, z, backend=backend, **opts).backward(torch.tensor(65536.0, device=device))
    s64 = student.detach().cpu().double().requires_grad_()
    z64 = experts.detach().cpu().double().requires_grad_()
    fused_experts_kd_loss_reference(s64, z64, **opts).backward(torch.tensor(65536.0, dtype=torch.float64))
    assert_close(s.grad.cpu(), s64.grad, FP16, "fp16 student grad under loss scaling")
    assert_close(z.grad.cpu(), z64.grad, FP16, "fp16 expert grad under loss scaling")


def test_kernels_reject_too_many_experts():
    require_backend("triton")
    experts, student = make_logits(17, 1, 5, FP32, masked=False, seed=1, device=device_for("triton"))
    with pytest.raises(_backends.BackendUnavailable, match="K=17"):
        fused_experts_kd_loss(student, experts, backend="triton")
    assert torch.isfinite(fused_experts_kd_loss(student, experts, backend="torch"))


def _bad_calls():
    z = torch.randn(3, 4, 7)
    s = torch.randn(4, 7)
    loss = fused_experts_kd_loss
    return [
        (lambda: fuse_experts(z, weights=torch.ones(4)),
         r"weights must have shape \[K\]=\[3\] or \[N, K\]=\[4, 3\].*got \(4,\)"),
        (lambda: loss(s, z, weights=torch.ones(5, 3)), r"\[N, K\]=\[4, 3\].*got \(5, 3\)"),
        (lambda: fuse_experts(z, weights=torch.tensor([1.0, -0.5, 1.0])), "non-negative"),
        (lambda: fuse_experts(z, weights=torch.zeros(3)), "all zero"),
        (lambda: loss(s, z, weights=torch.tensor([[1.0, 0, 0]] * 3 + [[0.0, 0, 0]])), "all zero"),
        (lambda: fuse_experts(z, weights=torch.tensor([1.0, math.nan, 1.0])), "finite"),
        (lambda: fuse_experts(z, weighting="variance"), "uniform, entropy, confidence"),
        (lambda: loss(s, z, space="hidden"), "logit, prob"),
        (lambda: loss(torch.randn(4, 8), z),
         r"student_logits \(4, 8\).*expert_logits \[K, N, V\] = \(3, 4, 7\)"),
        (lambda: loss(torch.randn(5, 7), z), r"student_logits \(5, 7\)"),
        (lambda: fuse_experts(z, sharpness=0.0), "sharpness must be > 0"),
        (lambda: loss(s, z, sharpness=-1.0), "sharpness must be > 0"),
        (lambda: fuse_experts(torch.randn(0, 4, 7)), "K >= 1"),
        (lambda: fuse_experts(torch.randn(4, 7)), r"3-D \[K, N, V\]"),
        (lambda: loss(s, z, temperature=0.0), "temperature must be > 0"),
        (lambda: loss(s, z, divergence="kl"), "unknown divergence"),
        (lambda: loss(s, z, hard_weight=1.0), "needs labels"),
    ]


@pytest.mark.parametrize("index", range(len(_bad_calls())))
def test_bad_input_raises_value_error(index):
    call, match = _bad_calls()[index]
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------------------------------------
# The Triton kernels compile for the GPU target (the interpreter does not check that)
# ---------------------------------------------------------------------------------------------
_COMPILE_SCRIPT = textwrap.dedent("""
    import itertools, triton
    from triton.backends.compiler import GPUTarget
    from kdengine.kernels import fuse_experts as f
    if "nvidia" not in triton.backends.backends:
        print("SKIP: this triton has no NVIDIA backend"); raise SystemExit(0)
    flags = ["WEIGHTING", "SPACE", "KIND", "HARD", "OWN_T1", "HAS_LABELS", "HAS_ROW_W", "GRAD_S", "GRAD_E",
             "K_PAD", "BLOCK"]
    k_pad, block, warps = f.launch_config(4, 70001)
    pointer = {"s_ptr": "bf16", "e_ptr": "bf16", "labels_ptr": "i64", "row_w_ptr": "fp32", "weights_ptr": "fp32",
               "scale_ptr": "fp32", "loss_ptr": "fp32", "alpha_ptr": "fp32", "ent_ptr": "fp32", "stats_ptr": "fp32",
               "gs_ptr": "bf16", "ge_ptr": "bf16"}
    ints = {"stride_s": "i64", "stride_ek": "i64", "stride_en": "i64", "stride_w": "i32", "stride_scale": "i32",
            "N": "i32", "V": "i32", "K": "i32", "ignore_index": "i32"}
    cases = itertools.product([f._fused_experts_kd_fwd_kernel, f._fused_experts_kd_bwd_kernel], [0, 1], range(6),
                              [1, 3], [True, False])
    for kernel, space, kind, weighting, full in cases:
        names = kernel.arg_names
        sig = {n: "*" + pointer[n] if n in pointer else ints.get(n, "constexpr" if n in flags else "fp32")
               for n in names}
        values = dict(WEIGHTING=weighting, SPACE=space, KIND=kind, K_PAD=k_pad, BLOCK=block)
        consts = {n: values.get(n, full) for n in flags if n in names}
        src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=consts)
        out = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
        assert out.asm.get("cubin"), (kernel, space, kind, weighting, full)
    print("OK")
""")


@pytest.mark.triton
def test_triton_kernels_compile_for_sm90():
    check_compiles(_COMPILE_SCRIPT)
