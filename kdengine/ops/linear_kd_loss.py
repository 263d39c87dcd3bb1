"""``linear_kd_loss``: the LM head(s) fused with :func:`kdengine.ops.kd_loss`, chunk by chunk.

For row chunks of C tokens (the full [N, V] logits of neither model ever exist):

    z_s = h_s[c] @ W_sᵀ                      fp32 [C, V]  (fp32 accumulation *and* output: the
    z_t = h_t[c] @ W_tᵀ  or  teacher_logits[c]            logits are never rounded to bf16 first,
                                                          the bug of Liger-Kernel #1432); given
                                                          teacher logits as they are (no fp32 copy)
    row_loss[c], g_s, g_t = rows(z_s, z_t)   gradients of Σ row_loss · grad_scale (the kd_loss
                                             rows primitive of the selected backend)
    dh_s[c] = g_s @ W_s        dW_s += g_sᵀ @ h_s[c]   (fp32 accumulator; teacher likewise)

``grad_scale`` (1 / valid rows for batchmean, ...) is one device scalar computed for all N rows
before the loop, so chunking changes nothing and nothing synchronises with the host. The
gradients are written during the forward; backward only multiplies them by grad_output.
With ``reduction="none"`` dW = Σ_rows grad_output[i] · g_iᵀ h_i does not factor out of the sum,
so the forward computes the row losses only and backward recomputes the chunks with each row
weighted by its grad_output.

Matmuls: with fp16/bf16 CUDA tensors, ``torch.mm(..., out_dtype=torch.float32)`` and
``torch.addmm(..., out_dtype=torch.float32)`` (torch >= 2.8, cuBLAS with fp32 output) give the
fp32 logits and the fp32 dW accumulation; the logit gradients enter dh / dW in the hidden
states' dtype, as in an unfused model, and every backend's kernel writes them in that dtype
directly (``grad_dtypes`` of :func:`_kernel_rows`: no fp32 [C, V] gradient, no conversion pass).
Elsewhere (CPU, fp32, float64) the chunk is upcast to the accumulation dtype (fp32, or float64
when an input is float64) and multiplied there.
"""

from __future__ import annotations

import functools
import numbers

import torch

from kdengine.constants import IGNORE_INDEX
from kdengine.ops import _backends
from kdengine.ops.kd_loss import (
    FLOAT_DTYPES,
    KERNEL_DTYPES,
    KDLossSpec,
    accumulation_dtype,
    check_row_args,
    grad_scale_for,
    make_spec,
    primitives,
)
from kdengine.ops.kd_loss import _chunk_rows as _kd_chunk_rows
from kdengine.reference.kd_loss import kd_loss_rows

# Default rows per chunk: the largest C with C · V <= budget elements (each fp32 [C, V] buffer
# is at most budget · 4 bytes; about four of them are alive at once), capped at GPU_MAX_ROWS.
# GPU: 2**29 elements (2 GiB fp32) -> 4096 rows at V = 128256 and at V = 32000.
# CPU: 2**22 elements (16 MiB fp32) -> 131 rows at V = 32000.
GPU_CHUNK_ELEMENTS = 1 << 29
GPU_MAX_ROWS = 4096
CPU_CHUNK_ELEMENTS = 1 << 22
HALF_DTYPES = (torch.bfloat16, torch.float16)


def default_chunk_rows(vocab: int, device: torch.device) -> int:
    """Rows per chunk when ``chunk_size`` is None (see GPU_/CPU_CHUNK_ELEMENTS)."""
    if device.type == "cuda":
        return max(1, min(GPU_MAX_ROWS, GPU_CHUNK_ELEMENTS // max(vocab, 1)))
    return max(1, CPU_CHUNK_ELEMENTS // max(vocab, 1))


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b of half CUDA matrices with fp32 accumulation and output (cuBLAS)."""
    return torch.mm(a, b, out_dtype=torch.float32)


def _addmm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """acc + a @ b of half CUDA matrices into the fp32 accumulator acc."""
    return torch.addmm(acc, a, b, out_dtype=torch.float32)


@functools.lru_cache(maxsize=None)
def _cuda_fp32_out_matmul(dtype: torch.dtype) -> bool:
    """Whether torch.mm / torch.addmm accept ``out_dtype=torch.float32`` for ``dtype`` CUDA inputs."""
    a = torch.ones(2, 2, dtype=dtype, device="cuda")
    try:
        mm = _mm_fp32(a, a)
        acc = _addmm_fp32(torch.zeros(2, 2, device="cuda"), a, a)
    except (RuntimeError, TypeError):
        return False
    return mm.dtype == torch.float32 and acc.dtype == torch.float32


def _fp32_out_head(hidden: torch.Tensor, compute: torch.dtype) -> bool:
    """Whether a head runs on the fp32-output matmuls: half CUDA hidden states, fp32 accumulation."""
    return (hidden.is_cuda and hidden.dtype in HALF_DTYPES and compute == torch.float32
            and _cuda_fp32_out_matmul(hidden.dtype))


class _Head:
    """One linear head (hidden [N, H] @ weight [V, H]ᵀ) and its gradient accumulators."""

    def __init__(self, hidden, weight, compute, need_hidden, need_weight):
        self.hidden, self.weight, self.compute = hidden, weight, compute
        self.fp32_out = _fp32_out_head(hidden, compute)
        # Weight used by the upcast path, converted once per pass (not per chunk).
        self.weight_c = weight if self.fp32_out else weight.to(compute)
        self.grad_hidden = (torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
                            if need_hidden else None)
        self.grad_weight = (torch.zeros(weight.shape, dtype=compute, device=weight.device)
                            if need_weight else None)
        # On the fp32-output path (half CUDA heads) the logit gradient enters dh and dW in the hidden
        # states' dtype, as in an unfused model: the kernel writes it in that dtype directly (no fp32
        # [C, V] gradient, no conversion pass).
        self.grad_dtype = hidden.dtype if self.fp32_out else None

    @property
    def needs_grad(self) -> bool:
        return self.grad_hidden is not None or self.grad_weight is not None

    def logits(self, rows: slice) -> torch.Tensor:
        """fp32 (float64) logits [C, V] of the chunk."""
        x = self.hidden[rows]
        if self.fp32_out:
            return _mm_fp32(x, self.weight.t())
        return torch.mm(x.to(self.compute), self.weight_c.t())

    def backprop(self, rows: slice, grad_logits: torch.Tensor) -> None:
        """dh[rows] = g @ W and dW += gᵀ @ h[rows] for the chunk's logit gradient g [C, V]."""
        x = self.hidden[rows]
        if self.fp32_out:  # grad_logits is already in x's dtype (grad_dtype)
            if self.grad_hidden is not None:
                torch.mm(grad_logits, self.weight, out=self.grad_hidden[rows])
            if self.grad_weight is not None:
                self.grad_weight = _addmm_fp32(self.grad_weight, grad_logits.t(), x)
            return
        g = grad_logits.to(self.compute)
        if self.grad_hidden is not None:
            self.grad_hidden[rows] = torch.mm(g, self.weight_c)
        if self.grad_weight is not None:
            self.grad_weight.addmm_(g.t(), x.to(self.compute))

    def grads(self):
        weight = None if self.grad_weight is None else self.grad_weight.to(self.weight.dtype)
        return self.grad_hidden, weight


def _kernel_rows(name: str):
    """The rows primitive of a fused backend (``triton`` or ``cuda``): row losses and the gradients of
    Σ row_loss · grad_scale in one call, the backend's forward kernel then its backward kernel with
    ``scale = grad_scale``.

    ``rows(student, teacher, labels, row_weights, grad_scale, spec, need_grad_student,
    need_grad_teacher, grad_dtypes=(None, None))``: each kernel reads the logits in their own dtypes
    (fp32 chunk logits against bf16 teacher logits: no fp32 copy of the teacher) and writes each
    gradient in its ``grad_dtypes`` entry (None: its logits' dtype) directly.
    """
    forward, backward = primitives(name)

    def rows(student, teacher, labels, row_weights, grad_scale, spec, need_grad_student, need_grad_teacher,
             grad_dtypes=(None, None)):
        row_loss, stats = forward(student, teacher, labels, row_weights, spec)
        grad_s, grad_t = backward(student, teacher, labels, row_weights, stats, grad_scale, spec,
                                  need_grad_student, need_grad_teacher, grad_dtypes=grad_dtypes)
        return row_loss, grad_s, grad_t

    return rows


def _torch_rows(student, teacher, labels, row_weights, grad_scale, spec, need_s, need_t, grad_dtypes=(None, None)):
    """The rows primitive (:func:`_kernel_rows`) on the reference math: row
    losses, then autograd, over sub-chunks of kd_loss's torch-backend size (the reference keeps ~a
    dozen [rows, V] temporaries alive); the teacher is converted to the student's dtype per sub-chunk."""
    n, v = student.shape
    row_loss = torch.empty(n, dtype=student.dtype, device=student.device)
    grad_s = torch.empty_like(student, dtype=grad_dtypes[0] or student.dtype) if need_s else None
    grad_t = torch.empty_like(teacher, dtype=grad_dtypes[1] or teacher.dtype) if need_t else None
    step = _kd_chunk_rows(v)
    for start in range(0, n, step):
        sl = slice(start, min(n, start + step))
        s = student[sl].detach().requires_grad_(need_s)
        t = teacher[sl].detach().to(student.dtype).requires_grad_(need_t)
        with torch.enable_grad():
            rows = kd_loss_rows(s, t, None if labels is None else labels[sl],
                                None if row_weights is None else row_weights[sl], **spec.rows_kwargs())
            inputs = [x for x in (s, t) if x.requires_grad]
            grads = list(torch.autograd.grad(rows, inputs,
                                             grad_outputs=grad_scale.to(rows.dtype).expand_as(rows))
                         if inputs else ())
        row_loss[sl] = rows.detach()
        if need_s:
            grad_s[sl] = grads.pop(0)
        if need_t:
            grad_t[sl] = grads.pop(0)
    return row_loss, grad_s, grad_t


def _chunked(primitive, chunk, spec, student, teacher, teacher_logits, labels, row_weights, grad_scale,
             need_teacher_logits):
    """One pass over the row chunks: (row_loss [N] in the accumulation dtype, grad of teacher_logits).

    ``student`` / ``teacher`` are :class:`_Head` (teacher None when teacher_logits are given);
    their gradient accumulators are filled in place.
    """
    n = student.hidden.shape[0]
    compute = student.compute
    row_loss = torch.empty(n, dtype=compute, device=student.hidden.device)
    grad_tl = (torch.empty(teacher_logits.shape, dtype=teacher_logits.dtype, device=teacher_logits.device)
               if need_teacher_logits else None)
    need_s = student.needs_grad
    need_t = need_teacher_logits or (teacher is not None and teacher.needs_grad)
    for start in range(0, n, chunk):
        rows = slice(start, min(n, start + chunk))
        z_s = student.logits(rows)
        z_t = teacher.logits(rows) if teacher is not None else teacher_logits[rows]  # as given: no fp32 copy
        loss, g_s, g_t = primitive(z_s, z_t, None if labels is None else labels[rows],
                                   None if row_weights is None else row_weights[rows], grad_scale, spec,
                                   need_s, need_t, (student.grad_dtype, None if teacher is None else teacher.grad_dtype))
        row_loss[rows] = loss
        del z_s, z_t
        if need_s:
            student.backprop(rows, g_s)
        if need_teacher_logits:
            grad_tl[rows] = g_t
        elif need_t:
            teacher.backprop(rows, g_t)
    return row_loss, grad_tl


class LinearKDLossFunction(torch.autograd.Function):
    """Chunked linear_kd_loss on any backend's rows primitive (see the module docstring)."""

    @staticmethod
    def forward(ctx, student_hidden, student_weight, teacher_logits, teacher_hidden, teacher_weight, labels,
                row_weights, grad_scale, spec, reduction, chunk, primitive):
        ctx.spec, ctx.reduction, ctx.chunk, ctx.primitive = spec, reduction, chunk, primitive
        ctx.used = False
        compute = accumulation_dtype(student_hidden, student_weight, teacher_logits, teacher_hidden,
                                     teacher_weight)
        needs = ctx.needs_input_grad[:5] if reduction != "none" else (False,) * 5
        student = _Head(student_hidden, student_weight, compute, needs[0], needs[1])
        teacher = (None if teacher_logits is not None
                   else _Head(teacher_hidden, teacher_weight, compute, needs[3], needs[4]))
        row_loss, grad_tl = _chunked(primitive, chunk, spec, student, teacher, teacher_logits, labels,
                                     row_weights, grad_scale, needs[2])
        if reduction == "none":
            ctx.save_for_backward(student_hidden, student_weight, teacher_logits, teacher_hidden,
                                  teacher_weight, labels, row_weights)
            return row_loss
        ctx.save_for_backward(*student.grads(), grad_tl, *(teacher.grads() if teacher else (None, None)))
        return row_loss.sum() * grad_scale

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.reduction == "none":
            grads = LinearKDLossFunction._recompute(ctx, grad_output)
        else:
            if ctx.used:
                raise RuntimeError("linear_kd_loss backward ran twice: its gradients are scaled in place, so "
                                   "retain_graph re-use is not supported; recompute the loss instead")
            ctx.used = True
            grads = [None if g is None else g.mul_(grad_output.to(g.dtype)) for g in ctx.saved_tensors]
        return (*grads, None, None, None, None, None, None, None)

    @staticmethod
    def _recompute(ctx, grad_output):
        """reduction='none': rerun the chunks with each row weighted by its grad_output."""
        hidden, weight, teacher_logits, teacher_hidden, teacher_weight, labels, row_weights = (
            ctx.saved_tensors)
        needs = ctx.needs_input_grad[:5]
        compute = accumulation_dtype(hidden, weight, teacher_logits, teacher_hidden, teacher_weight)
        student = _Head(hidden, weight, compute, needs[0], needs[1])
        teacher = (None if teacher_logits is not None
                   else _Head(teacher_hidden, teacher_weight, compute, needs[3], needs[4]))
        weights = grad_output if row_weights is None else grad_output * row_weights
        one = torch.ones((), dtype=compute, device=hidden.device)
        _, grad_tl = _chunked(ctx.primitive, ctx.chunk, ctx.spec, student, teacher, teacher_logits, labels,
                              weights.to(compute), one, needs[2])
        return (*student.grads(), grad_tl, *(teacher.grads() if teacher else (None, None)))


def _check_matrix(name: str, t, dims: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be a floating tensor (float32, bfloat16, float16 or float64), got "
                         f"{t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D {dims}, got shape {tuple(t.shape)}")


def _check_head(hidden_name, hidden, weight_name, weight, n_rows: int | None, vocab: int | None) -> None:
    """[N, H] hidden states against a [V, H] weight: dims, hidden size, rows, vocabulary, dtype, device."""
    _check_matrix(hidden_name, hidden, "[N, H] (flatten batch and sequence first)")
    _check_matrix(weight_name, weight, "[V, H] (the lm_head weight, as nn.Linear stores it)")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden size mismatch: {hidden_name} has H={hidden.shape[1]} but {weight_name} has "
                         f"H={weight.shape[1]} (expected {weight_name} of shape [V, {hidden.shape[1]}])")
    if n_rows is not None and hidden.shape[0] != n_rows:
        raise ValueError(f"row mismatch: student_hidden has N={n_rows} rows but {hidden_name} has "
                         f"N={hidden.shape[0]}")
    if vocab is not None and weight.shape[0] != vocab:
        raise ValueError(f"vocabulary mismatch: student_weight has V={vocab} but {weight_name} has "
                         f"V={weight.shape[0]}; both heads must cover the same vocabulary")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"{hidden_name} is {hidden.dtype} but {weight_name} is {weight.dtype}; a head's "
                         "hidden "
                         "states and weight must share a dtype")
    if hidden.device != weight.device:
        raise ValueError(f"{hidden_name} is on {hidden.device} but {weight_name} is on {weight.device}")


def _check_teacher(student_hidden, student_weight, teacher_logits, teacher_hidden, teacher_weight) -> None:
    n, v = student_hidden.shape[0], student_weight.shape[0]
    has_logits = teacher_logits is not None
    has_head = teacher_hidden is not None or teacher_weight is not None
    if has_logits and has_head:
        raise ValueError("give exactly one teacher source: teacher_logits [N, V] or teacher_hidden [N, Ht] + "
                         "teacher_weight [V, Ht], not both")
    if not has_logits and not has_head:
        raise ValueError("no teacher: give teacher_logits [N, V] or teacher_hidden [N, Ht] + teacher_weight "
                         "[V, Ht]")
    if has_head and (teacher_hidden is None or teacher_weight is None):
        missing = "teacher_weight [V, Ht]" if teacher_weight is None else "teacher_hidden [N, Ht]"
        raise ValueError(f"the teacher head needs both teacher_hidden and teacher_weight; {missing} is "
                         "missing")
    if has_head:
        _check_head("teacher_hidden", teacher_hidden, "teacher_weight", teacher_weight, n, v)
        device = teacher_hidden.device
    else:
        _check_matrix("teacher_logits", teacher_logits, "[N, V] (flatten batch and sequence first)")
        if teacher_logits.shape[1] != v:
            raise ValueError(f"vocabulary mismatch: student_weight has V={v} but teacher_logits has "
                             f"V={teacher_logits.shape[1]}; both must cover the same vocabulary")
        if teacher_logits.shape[0] != n:
            raise ValueError(f"row mismatch: student_hidden has N={n} rows but teacher_logits has "
                             f"N={teacher_logits.shape[0]}")
        device = teacher_logits.device
    if device != student_hidden.device:
        raise ValueError(f"student_hidden is on {student_hidden.device} but the teacher is on {device}")


def _check_chunk_size(chunk_size) -> None:
    if chunk_size is None:
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer (rows per chunk) or None, got "
                         f"{chunk_size!r}")


def _kernel_reasons(name: str, tensors) -> list[str]:
    reasons = _backends.tensor_device_reasons(name, tensors)
    if name != "torch":
        bad = sorted({str(t.dtype) for t in tensors if t is not None and t.dtype.is_floating_point
                      and t.dtype not in KERNEL_DTYPES})
        if bad:
            reasons.append(f"dtype {', '.join(bad)} unsupported (fp32/bf16/fp16; float64 runs on the torch "
                           "backend)")
    return reasons


def linear_kd_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                   teacher_logits: torch.Tensor | None = None, *, teacher_hidden: torch.Tensor | None = None,
                   teacher_weight: torch.Tensor | None = None, divergence: str = "forward_kl",
                   temperature: float = 1.0, t2_scale: bool = True, jsd_beta: float = 0.5,
                   labels: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX, kd_weight: float = 1.0,
                   hard_weight: float = 0.0, row_weights: torch.Tensor | None = None,
                   reduction: str = "batchmean", normalizer=None, chunk_size: int | None = None,
                   backend: str | None = "auto") -> torch.Tensor:
    """kd_loss of ``student_hidden @ student_weightᵀ`` against a teacher, without [N, V] logits.

    Equals ``kd_loss(student_hidden @ student_weight.T, teacher_logits, ...)`` (teacher logits
    likewise from ``teacher_hidden @ teacher_weight.T``), computed in row chunks.

    Args:
        student_hidden: [N, H] float32/bfloat16/float16 (float64: torch backend only), the final
            hidden states with batch and sequence flattened.
        student_weight: [V, H], the student's lm_head weight (``nn.Linear.weight``), same dtype
            and device as ``student_hidden``.
        teacher_logits: [N, V] teacher logits (any float dtype), or None when the teacher head is
            given instead. Exactly one teacher source.
        teacher_hidden, teacher_weight: [N, Ht] and [V, Ht], the teacher's hidden states and
            lm_head weight (same dtype). Get gradients only when they require grad.
        divergence, temperature, t2_scale, jsd_beta, labels, ignore_index, kd_weight,
        hard_weight, row_weights, reduction, normalizer: as :func:`kdengine.ops.kd_loss`.
        chunk_size: rows per chunk; None picks :func:`default_chunk_rows` (~4096 rows on GPU,
            C · V <= 2**22 elements on CPU). Results do not depend on it beyond rounding.
        backend: ``auto`` | ``cuda`` | ``triton`` | ``torch`` — whose kd_loss rows primitive runs
            on each chunk (the matmuls are torch's); ``KDENGINE_BACKEND`` overrides.

    Returns:
        fp32 scalar, or fp32 [N] with ``reduction="none"`` (float64 when an input is float64).
        Gradients: student_hidden and teacher_hidden in their dtype; the weights' gradients are
        accumulated in fp32 and returned in the weights' dtype. A NaN or +inf in a row's logits
        (from the teacher logits, or either model's hidden states or weights) makes that row's
        loss and gradients NaN, as in ``kd_loss``.

    Backward can run once per forward (the gradients are computed in the forward and scaled in
    place), except with ``reduction="none"``, whose backward recomputes the chunks.
    """
    _check_head("student_hidden", student_hidden, "student_weight", student_weight, None, None)
    _check_teacher(student_hidden, student_weight, teacher_logits, teacher_hidden, teacher_weight)
    _check_chunk_size(chunk_size)
    spec: KDLossSpec = make_spec(divergence=divergence, temperature=temperature, t2_scale=t2_scale,
                                 jsd_beta=jsd_beta, ignore_index=ignore_index, kd_weight=kd_weight,
                                 hard_weight=hard_weight)
    n, v = student_hidden.shape[0], student_weight.shape[0]
    device = student_hidden.device
    labels, row_weights = check_row_args(n, device, labels, row_weights, reduction, normalizer, spec)
    tensors = [student_hidden, student_weight, teacher_logits, teacher_hidden, teacher_weight, labels,
               row_weights]
    name = _backends.select("linear_kd_loss", backend, lambda b: _kernel_reasons(b, tensors))
    compute = accumulation_dtype(student_hidden, student_weight, teacher_logits, teacher_hidden,
                                 teacher_weight)
    grad_scale = grad_scale_for(reduction, normalizer, labels, spec, n, v, device, compute)
    primitive = _torch_rows if name == "torch" else _kernel_rows(name)
    chunk = int(chunk_size) if chunk_size is not None else default_chunk_rows(v, device)
    return LinearKDLossFunction.apply(student_hidden, student_weight, teacher_logits, teacher_hidden,
                                      teacher_weight, labels, row_weights, grad_scale, spec, reduction, chunk,
                                      primitive)
