"""sparse_kd_loss: every backend against the float64 reference (losses and student gradients).

The options are crossed with the pairwise design of tests/ops/test_kd_loss.py. Teacher top-k
log-probs come from a float64 log_softmax of random logits at the case's temperature; the reference
runs in float64 on the same values and tests/tolerances.py compares.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from benchmarks.traffic import measure
from kdengine.ops import BackendUnavailable, kd_loss, sparse_kd_loss
from kdengine.ops.sparse_kd_loss import TRITON_MAX_K
from kdengine.reference.sparse_kd_loss import (
    IGNORE_DIVERGENCES,
    SPARSE_DIVERGENCES,
    TAIL_FLOOR,
    TAILS,
    sparse_kd_loss_reference,
)
from tests.conftest import backend_params, device_for, require_backend
from tests.ops.test_kd_loss import make_labels, make_logits, pairwise
from tests.ops.triton_compile import check_compiles
from tests.tolerances import assert_close

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:divide by zero encountered:RuntimeWarning")

FACTORS = {
    # (tail, divergence, jsd_beta): ignore truncates the KL family only
    "tail_divergence": [(tail, div, beta) for tail in TAILS for div, beta in
                        [("forward_kl", 0.5), ("reverse_kl", 0.5), ("soft_ce", 0.5), ("jsd", 0.3), ("jsd", 0.0),
                         ("tvd", 0.5)] if tail != "ignore" or div not in ("jsd", "tvd") or beta == 0.0],
    "reduce": [("batchmean", None), ("sum", None), ("mean", None), ("none", None), ("batchmean", 3.0)],
    "dtype": [torch.float32, torch.bfloat16, torch.float16],
    # (N, V, k): k = 1, k = V, one row, a partial last chunk of V
    "shape": [(5, 1009, 7), (3, 97, 97), (4, 300, 1), (1, 4099, 32)],
    "temperature": [1.0, 2.5],
    "labels": ["none", "ignored", "hard"],
    "layout": ["contiguous", "row_strided", "transposed"],
    "masked": [False, True],
    "row_weights": [False, True],
    "grad_output": [1.0, 2.5],
}
CASES = pairwise(FACTORS)


def case_id(case: dict) -> str:
    n, v, k = case["shape"]
    tail, div, beta = case["tail_divergence"]
    return "-".join([tail, div + (f"{beta}" if div == "jsd" else ""), case["reduce"][0] + (f"/{case['reduce'][1]}" if
                     case["reduce"][1] else ""), str(case["dtype"]).replace("torch.", ""), f"{n}x{v}k{k}",
                     f"T{case['temperature']}", case["labels"], case["layout"], "masked" if case["masked"] else "dense",
                     "rw" if case["row_weights"] else "norw", f"go{case['grad_output']}"])


def test_design_covers_every_pair():
    covered = {(a, repr(c[a]), b, repr(c[b])) for c in CASES for a, b in itertools.combinations(FACTORS, 2)}
    for a, b in itertools.combinations(FACTORS, 2):
        for x, y in itertools.product(FACTORS[a], FACTORS[b]):
            assert (a, repr(x), b, repr(y)) in covered, (a, x, b, y)


def teacher_topk(teacher: torch.Tensor, k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs fp32 [N, k], indices int64 [N, k]) of the teacher's k most likely columns at T."""
    logprobs, indices = torch.log_softmax(teacher.double() / temperature, -1).topk(k, -1)
    return logprobs.float(), indices


def run_case(backend: str, case: dict) -> None:
    device = device_for(backend)
    dtype = case["dtype"]
    n, v, k = case["shape"]
    tail, divergence, beta = case["tail_divergence"]
    reduction, normalizer = case["reduce"]
    student = make_logits(n, v, dtype, case["layout"], case["masked"], device).requires_grad_()
    teacher = make_logits(n, v, torch.float32, "contiguous", case["masked"], device)
    logprobs, indices = teacher_topk(teacher, k, case["temperature"])
    labels, ignore_index, hard_weight = make_labels(case["labels"], n, v, case["masked"], device)
    row_weights = (torch.rand(n) + 0.5).to(device) if case["row_weights"] else None
    options = {"tail": tail, "divergence": divergence, "jsd_beta": beta, "temperature": case["temperature"],
               "ignore_index": ignore_index, "hard_weight": hard_weight, "reduction": reduction,
               "normalizer": normalizer, "labels": labels}
    loss = sparse_kd_loss(student, logprobs, indices, row_weights=row_weights, backend=backend, **options)
    s64 = student.detach().double().requires_grad_()
    want = sparse_kd_loss_reference(s64, logprobs.double(), indices, **options,
                                    row_weights=None if row_weights is None else row_weights.double())
    assert loss.dtype == torch.float32 and loss.shape == want.shape
    assert_close(loss, want, torch.float32, msg="loss")
    grad_output = torch.full(loss.shape, case["grad_output"])
    if reduction == "none" and case["grad_output"] != 1.0:
        grad_output = grad_output * (torch.rand(n) + 0.5)
    loss.backward(grad_output.to(device))
    want.backward(grad_output.double())
    assert student.grad.dtype == dtype and student.grad.shape == student.shape
    assert_close(student.grad, s64.grad, dtype, msg="grad student")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_reference(backend, case):
    if backend == "cuda":
        pytest.skip("sparse_kd_loss has no CUDA-extension kernel (test_cuda_backend_refused)")
    run_case(backend, case)


@pytest.mark.parametrize("divergence", SPARSE_DIVERGENCES)
def test_full_vocabulary_equals_kd_loss(divergence):
    """k = V: the top-k teacher is the whole teacher, so bucket and renormalize are kd_loss (up to the
    TAIL_FLOOR of the empty bucket) and ignore is kd_loss too (P = 1, Σ q = 1)."""
    student = torch.randn(4, 61, dtype=torch.float64) * 3
    teacher = torch.randn(4, 61, dtype=torch.float64) * 3
    logprobs, indices = torch.log_softmax(teacher / 1.5, -1).topk(61, -1)
    want = kd_loss(student, teacher, divergence=divergence, temperature=1.5, reduction="none", backend="torch")
    for tail in TAILS if divergence in IGNORE_DIVERGENCES else ("bucket", "renormalize"):
        got = sparse_kd_loss(student, logprobs, indices, tail=tail, divergence=divergence, temperature=1.5,
                             reduction="none", backend="torch")
        # the empty bucket at TAIL_FLOOR on both sides adds −τ ln τ ≈ 1.3e-5 to soft_ce
        assert torch.allclose(got, want, atol=1e-4, rtol=0), (tail, got, want)


def test_bucket_is_a_coarser_kd_loss():
    """Forward KL with the tail bucketed never exceeds the full-vocabulary KL (merging outcomes cannot
    increase a KL divergence), and renormalize drops the tail mass entirely."""
    student = torch.randn(16, 500, dtype=torch.float64) * 2
    teacher = torch.randn(16, 500, dtype=torch.float64) * 2
    full = kd_loss(student, teacher, reduction="none", backend="torch")
    logprobs, indices = torch.log_softmax(teacher, -1).topk(20, -1)
    bucket = sparse_kd_loss(student, logprobs, indices, tail="bucket", reduction="none", backend="torch")
    assert (bucket <= full + 1e-12).all() and (bucket > 0).all()


@pytest.mark.parametrize("tail", TAILS)
def test_ties_and_uniform_teacher(backend, tail):
    """Tied teacher log-probs (a uniform teacher: any k columns are a valid top-k) and tied student logits."""
    divergence = "soft_ce" if tail == "ignore" else "jsd"
    if backend == "cuda":
        pytest.skip("no CUDA-extension kernel")
    device = device_for(backend)
    student = torch.randn(3, 257)
    student[:, :40] = 1.25  # ties in the student
    teacher = torch.zeros(3, 257)
    logprobs, indices = teacher_topk(teacher, 16, 1.0)
    s = student.to(device).requires_grad_()
    loss = sparse_kd_loss(s, logprobs.to(device), indices.to(device), tail=tail, divergence=divergence,
                          backend=backend)
    loss.backward()
    s64 = student.detach().double().requires_grad_()
    want = sparse_kd_loss_reference(s64, logprobs.double(), indices, tail=tail, divergence=divergence)
    want.backward()
    assert_close(loss, want, torch.float32, msg="loss")
    assert_close(s.grad, s64.grad, torch.float32, msg="grad student")


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_all_rows_ignored(backend, tail, reduction):
    """Ignored rows: exactly zero loss and gradients, also with huge logits and broken indices."""
    if backend == "cuda":
        pytest.skip("no CUDA-extension kernel")
    device = device_for(backend)
    student = (torch.randn(3, 257, device=device) * 300).requires_grad_()
    logprobs, indices = teacher_topk(torch.randn(3, 257, device=device), 8, 2.0)
    indices[1, 0] = 900  # out of range, but the row is ignored
    labels = torch.full((3,), -100, dtype=torch.long, device=device)
    loss = sparse_kd_loss(student, logprobs, indices, tail=tail, temperature=2.0, labels=labels, hard_weight=0.5,
                          reduction=reduction, backend=backend)
    assert torch.equal(loss.detach().cpu(), torch.zeros(loss.shape))
    loss.backward(torch.full(loss.shape, 3.0, device=device))
    assert torch.equal(student.grad.cpu(), torch.zeros(3, 257))


@pytest.mark.parametrize("tail", TAILS)
def test_broken_rows_are_nan(backend, tail):
    """Row 1: an index out of range; row 2: a repeated column; row 3: a NaN student logit; row 4: a
    +inf log-prob. Each gives a NaN loss and an all-NaN student gradient row; rows 0 and 5 match
    float64 (row 5 holds −inf teacher log-probs: zero-probability columns, not broken)."""
    if backend == "cuda":
        pytest.skip("no CUDA-extension kernel")
    device = device_for(backend)
    v = 211
    student = torch.randn(6, v) * 3
    logprobs, indices = teacher_topk(torch.randn(6, v) * 3, 6, 1.0)
    indices[1, 2] = v
    indices[2, 3] = indices[2, 0]
    student[3, 17] = math.nan
    logprobs[4, 1] = math.inf
    logprobs[5, 4:] = -math.inf
    s = student.to(device).requires_grad_()
    loss = sparse_kd_loss(s, logprobs.to(device), indices.to(device), tail=tail, reduction="none", backend=backend)
    loss.backward(torch.ones(6, device=device))
    rows, grad = loss.detach().cpu(), s.grad.cpu()
    assert torch.isnan(rows[1:5]).all() and torch.isnan(grad[1:5]).all()
    s64 = student.detach().double().requires_grad_()
    want = sparse_kd_loss_reference(s64, logprobs.double(), indices, tail=tail, reduction="none")
    want.backward(torch.ones(6, dtype=torch.float64))
    assert torch.isnan(want[1:5]).all() and torch.isnan(s64.grad[1:5]).all()
    keep = torch.tensor([0, 5])
    assert_close(rows[keep], want[keep], torch.float32, msg="clean rows")
    assert_close(grad[keep], s64.grad[keep], torch.float32, msg="clean gradient rows")


def test_backward_can_run_twice(backend):
    if backend == "cuda":
        pytest.skip("no CUDA-extension kernel")
    device = device_for(backend)
    student = torch.randn(3, 257, device=device, requires_grad=True)
    logprobs, indices = teacher_topk(torch.randn(3, 257, device=device), 5, 1.0)
    loss = sparse_kd_loss(student, logprobs, indices, divergence="tvd", backend=backend)
    loss.backward(retain_graph=True)
    first = student.grad.clone()
    student.grad = None
    loss.backward()
    assert torch.equal(student.grad, first)


def test_gradcheck_torch_float64():
    student = torch.randn(3, 11, dtype=torch.float64) * 2
    student[:, 4] = float("-inf")
    logprobs, indices = torch.log_softmax(torch.randn(3, 11, dtype=torch.float64), -1).topk(4, -1)
    labels = torch.tensor([2, -100, 7])
    for tail, (divergence, beta) in itertools.product(TAILS, [*((d, 0.5) for d in SPARSE_DIVERGENCES), ("jsd", 0.0)]):
        if tail == "ignore" and divergence in ("jsd", "tvd") and beta != 0.0:
            continue
        def fn(s, tail=tail, divergence=divergence, beta=beta):
            return sparse_kd_loss(s, logprobs, indices, tail=tail, divergence=divergence, jsd_beta=beta,
                                  temperature=1.7, labels=labels, hard_weight=0.4, reduction="none", backend="torch")

        assert torch.autograd.gradcheck(fn, (student.clone().requires_grad_(),)), (tail, divergence)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_traffic(dtype):
    """Student read twice (forward once, backward once), gradient written once, nothing else [N, V]:
    3 units of one [N, V] pass plus O(k / V) for the gathers and the k overwritten columns."""
    require_backend("triton")
    if torch.cuda.is_available():
        pytest.skip("the traffic counter hooks the Triton interpreter (CPU, TRITON_INTERPRET=1)")
    n, v, k = 4, 4099, 32
    student = (torch.randn(n, v) * 3).to(dtype).requires_grad_()
    logprobs, indices = teacher_topk(torch.randn(n, v) * 3, k, 2.0)

    def run():
        sparse_kd_loss(student, logprobs, indices, temperature=2.0, backend="triton").backward(torch.tensor(2.0))

    unit = n * v * student.element_size()
    units, parts = measure(run, unit, student=student)
    gathers = 2 * n * k * (logprobs.element_size() + indices.element_size()) / unit  # forward + backward
    assert parts["student read"] <= 2.0 + 0.02, parts
    assert parts["other write"] <= 1.0 + 0.02, parts
    assert units <= 3.0 + gathers + 0.05, (units, gathers, parts)


def _bad(**overrides):
    logprobs, indices = torch.log_softmax(torch.randn(4, 10), -1).topk(3, -1)
    args = {"student_logits": torch.randn(4, 10), "teacher_topk_logprobs": logprobs, "teacher_topk_indices": indices}
    args.update(overrides)
    return args


@pytest.mark.parametrize("args, match", [
    (_bad(tail="drop"), r"unknown tail 'drop'; expected one of bucket, renormalize, ignore"),
    (_bad(divergence="mse"), r"divergence 'mse' is not available from top-k log-probs.*raw logits"),
    (_bad(tail="ignore", divergence="tvd"), r"tail='ignore' sums .* tvd needs tail='bucket' or 'renormalize'"),
    (_bad(teacher_topk_logprobs=torch.randn(3, 3)), r"teacher_topk_indices has shape \(4, 3\) but"),
    (_bad(teacher_topk_logprobs=torch.randn(3, 3), teacher_topk_indices=torch.zeros(3, 3, dtype=torch.long)),
     r"row mismatch.*N=4.*N=3"),
    (_bad(teacher_topk_logprobs=torch.randn(4, 11), teacher_topk_indices=torch.zeros(4, 11, dtype=torch.long)),
     r"k=11 teacher columns per row for a vocabulary of V=10"),
    (_bad(teacher_topk_logprobs=torch.randn(4, 0), teacher_topk_indices=torch.zeros(4, 0, dtype=torch.long)),
     r"k=0 .* expected 1 <= k <= V"),
    (_bad(teacher_topk_indices=torch.zeros(4, 3)), r"teacher_topk_indices must be an integer tensor"),
    (_bad(student_logits=torch.randint(0, 5, (4, 10))), r"student_logits must be a floating tensor"),
    (_bad(teacher_topk_logprobs=torch.randn(4, 3, requires_grad=True)), r"treats the cached teacher as a constant"),
    (_bad(temperature=0.0), r"temperature must be > 0"),
    (_bad(labels=torch.zeros(3, dtype=torch.long)), r"labels must have shape \[N\]=\[4\]"),
    (_bad(hard_weight=1.0), r"hard_weight != 0 needs labels"),
])
def test_validation_errors(args, match):
    with pytest.raises(ValueError, match=match):
        sparse_kd_loss(**args)


def test_cuda_backend_refused():
    with pytest.raises(BackendUnavailable, match="sparse_kd_loss.*cuda"):
        sparse_kd_loss(**_bad(), backend="cuda")


@pytest.mark.parametrize("backend", backend_params("triton"), indirect=True)
def test_triton_refuses_what_it_cannot_run(backend):
    student = torch.randn(2, 2000, dtype=torch.float64)
    logprobs, indices = torch.log_softmax(student, -1).topk(4, -1)
    with pytest.raises(BackendUnavailable, match="float64 unsupported"):
        sparse_kd_loss(student, logprobs, indices, backend=backend)
    logprobs, indices = torch.log_softmax(student.float(), -1).topk(TRITON_MAX_K + 1, -1)
    with pytest.raises(BackendUnavailable, match=f"k={TRITON_MAX_K + 1} > {TRITON_MAX_K}"):
        sparse_kd_loss(student.float(), logprobs, indices, backend=backend)


def test_tail_floor_applies_to_both_sides():
    """A student whose mass is all inside the k columns (the rest −inf) against a teacher with no tail:
    both tails sit at TAIL_FLOOR, the bucket adds nothing and the gradient stays finite."""
    student = torch.full((1, 50), -math.inf, dtype=torch.float64)
    student[0, :5] = torch.randn(5, dtype=torch.float64)
    teacher = student.clone()
    teacher[0, :5] = torch.randn(5, dtype=torch.float64)
    logprobs, indices = torch.log_softmax(teacher, -1).topk(5, -1)
    s = student.clone().requires_grad_()
    loss = sparse_kd_loss(s, logprobs, indices, tail="bucket", backend="torch")
    want = kd_loss(student, teacher, backend="torch")
    assert abs(loss.item() - want.item()) <= TAIL_FLOOR
    loss.backward()
    assert torch.isfinite(s.grad[0, :5]).all() and (s.grad[0, 5:] == 0).all()


@pytest.mark.parametrize("tail", ["renormalize"])
def test_tvd_peaked_rows_exact(backend, tail):
    """TVD over the slots in peaked rows: as kd_loss, D and the gradient come from sums split by the
    sign of p − q, so a confident student's gradient (~1e-6 of its terms) matches float64 row by row.
    Not tail="bucket": there the kernel's student tail 1 − Σ_k q keeps only ~1e-7 / (1 − Σ_k q) of
    relative precision (docs/kernels.md, "sparse_kd_loss")."""
    if backend == "cuda":
        pytest.skip("no CUDA-extension kernel")
    device = device_for(backend)
    student = torch.randn(4, 1531)
    top = torch.randint(1531, (4,))
    student[torch.arange(4), top] = 20.0
    teacher = student.clone()
    teacher[torch.arange(4), top] = 17.0
    teacher[:, :700] += 0.3 * torch.randn(4, 700)
    logprobs, indices = teacher_topk(teacher, 8, 1.0)
    s = student.to(device).requires_grad_()
    loss = sparse_kd_loss(s, logprobs.to(device), indices.to(device), tail=tail, divergence="tvd", reduction="sum",
                          backend=backend)
    loss.backward(torch.tensor(3.0, device=device))
    s64 = student.detach().double().requires_grad_()
    want = sparse_kd_loss_reference(s64, logprobs.double(), indices, tail=tail, divergence="tvd", reduction="sum")
    want.backward(torch.tensor(3.0, dtype=torch.float64))
    assert_close(loss, want, torch.float32, msg="loss")
    for row in range(4):
        assert_close(s.grad[row], s64.grad[row], torch.float32, msg=f"grad student row {row}")


_COMPILE_SCRIPT = """
import itertools, triton
from triton.backends.compiler import GPUTarget
from kdengine.kernels import sparse_kd_loss as k
if "nvidia" not in triton.backends.backends:
    print("SKIP: this triton has no NVIDIA backend"); raise SystemExit(0)
flags = ["KIND", "TAIL", "HARD", "OWN_T1", "HAS_LABELS", "HAS_WEIGHTS", "BLOCK", "KP"]
block, warps = k.launch_config(70001)
for kernel, kind, tail, full in itertools.product([k._sparse_fwd_kernel, k._sparse_bwd_kernel], range(5), range(3),
                                                  [True, False]):
    pointer = {"s_ptr": "bf16", "lp_ptr": "fp32", "idx_ptr": "i64", "labels_ptr": "i64", "weights_ptr": "fp32",
               "scale_ptr": "fp32", "stats_ptr": "fp32", "loss_ptr": "fp32", "gs_ptr": "bf16"}
    ints = {"V", "K", "stride_s", "stride_lp", "stride_idx", "stride_scale", "ignore_index"}
    sig = {n: "*" + pointer[n] if n in pointer else "i64" if n in ints else "constexpr" if n in flags else "fp32"
           for n in kernel.arg_names}
    consts = {"KIND": kind, "TAIL": tail, "HARD": full, "OWN_T1": full, "HAS_LABELS": full, "HAS_WEIGHTS": full,
              "BLOCK": block, "KP": 64}
    src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=consts)
    out = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    assert out.asm.get("cubin"), (kernel, kind, tail, full)
print("OK")
"""


@pytest.mark.triton
def test_triton_kernel_compiles_for_sm90():
    check_compiles(_COMPILE_SCRIPT)
