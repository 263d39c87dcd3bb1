"""The CUDA backend's Python side: prepares tensors for kdengine._C (csrc/bindings.cpp) and calls it.

Imported only when the dispatcher picked ``backend="cuda"`` (so never at ``import kdengine``). Each
function runs under ``torch.cuda.device(...)`` of its inputs and hands the current stream to the
extension as an int. Conversions done here, so that the kernels see one layout:

* logits with a non-unit last stride are copied contiguous (any row stride is used as is);
* labels -> int64, row_weights -> fp32, input ids / masks / expert indices -> contiguous int64,
  prompts -> the embedding weight's dtype (as the reference does);
* option strings -> the integer codes of csrc/launchers.h.

The functions implement the fused-backend primitives of kd_loss, fuse_experts and
expert_batch_embed with the signatures their dispatchers document.
"""

from __future__ import annotations

import torch

from kdengine import _ext
from kdengine.ops._backends import BackendUnavailable

# Integer codes of csrc/launchers.h (enums Divergence, Weighting, FusionSpace, Placement).
DIVERGENCE_CODES = {"forward_kl": 0, "reverse_kl": 1, "soft_ce": 2, "jsd": 3, "tvd": 4, "mse": 5}
WEIGHTING_CODES = {"uniform": 0, "entropy": 1, "confidence": 2}
SPACE_CODES = {"logit": 0, "prob": 1}
PLACEMENT_CODES = {"prepend": 0, "append": 1}


def _module():
    module, reason = _ext.load()
    if module is None:
        raise BackendUnavailable(reason)
    return module


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _unit_columns(t: torch.Tensor) -> torch.Tensor:
    """t itself when its last dimension has unit stride, else a contiguous copy."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _row_inputs(labels, row_weights):
    labels = None if labels is None else labels.to(torch.int64).contiguous()
    row_weights = None if row_weights is None else row_weights.to(torch.float32).contiguous()
    return labels, row_weights


def _loss_args(spec) -> tuple:
    """(divergence code, temperature, jsd_beta, kd_scale, hard_weight, ignore_index) of a KDLossSpec."""
    return (DIVERGENCE_CODES[spec.kind], spec.temperature, spec.jsd_beta, spec.kd_scale, spec.hard_weight,
            spec.ignore_index)


def kd_loss_forward_cuda(student, teacher, labels, row_weights, spec):
    """kd_loss forward on kdengine._C (see ``primitives`` in kdengine/ops/kd_loss.py).

    Args:
        student, teacher: [N, V] CUDA logits (fp32/bf16/fp16), each read in its own dtype: the same
            dtype, or one side fp32 (no copy of the other).
        labels: [N] integer or None; row_weights: [N] float or None. spec: KDLossSpec.

    Returns:
        (row_loss fp32 [N], stats fp32 [N, kRowStats]): the row losses and the per-row statistics
        :func:`kd_loss_backward_cuda` reads.
    """
    labels, row_weights = _row_inputs(labels, row_weights)
    with torch.cuda.device(student.device):
        return _module().kd_loss_forward(_unit_columns(student), _unit_columns(teacher), labels, row_weights,
                                         *_loss_args(spec), _stream(student.device))


def kd_loss_backward_cuda(student, teacher, labels, row_weights, stats, scale, spec, need_grad_student,
                          need_grad_teacher, grad_dtypes=(None, None)):
    """kd_loss backward on kdengine._C: the gradients of Σ_rows scale · row_loss.

    Args:
        student, teacher, labels, row_weights, spec: as given to :func:`kd_loss_forward_cuda`; stats: its
            statistics. scale: fp32 device tensor, 0-d or [N], dL/d(row_loss).
        need_grad_student / need_grad_teacher: which gradients to write.
        grad_dtypes: (student's, teacher's) gradient dtype (fp32/bf16/fp16), None for the logits' own.

    Returns:
        (grad_student [N, V] | None, grad_teacher [N, V] | None) in those dtypes, computed in fp32 with
        ``scale`` in and rounded once by the kernel (no conversion pass).
    """
    labels, row_weights = _row_inputs(labels, row_weights)
    with torch.cuda.device(student.device):
        return _module().kd_loss_backward(
            _unit_columns(student), _unit_columns(teacher), labels, row_weights, stats,
            scale.to(torch.float32).contiguous(), *_loss_args(spec), bool(need_grad_student),
            bool(need_grad_teacher), *grad_dtypes, _stream(student.device))


def fuse_experts_cuda(experts, temperature, weighting, space, sharpness, weights):
    """Fused teacher of K <= 16 experts on kdengine._C.

    Args:
        experts: [K, N, V] CUDA logits (fp32/bf16/fp16), any expert/row strides.
        temperature, sharpness: > 0. weighting: uniform | entropy | confidence. space: logit | prob.
        weights: normalised fp32 [K] or [N, K] overriding ``weighting``, or None.

    Returns:
        (log_probs fp32 [N, V], alpha fp32 [N, K], entropy fp32 [N, K]).
    """
    weights = None if weights is None else weights.to(torch.float32).contiguous()
    with torch.cuda.device(experts.device):
        return _module().fuse_experts_forward(
            _unit_columns(experts), float(temperature), WEIGHTING_CODES[weighting], SPACE_CODES[space],
            float(sharpness), weights, _stream(experts.device))


def fused_experts_kd_forward_cuda(student, experts, labels, row_weights, spec, weighting, space, sharpness,
                                  weights):
    """fused_experts_kd_loss forward (teacher T · log p̄, temperature = spec.temperature) on kdengine._C.

    Args:
        student: [N, V] CUDA logits; experts: [K, N, V] (K <= 16), same dtype.
        labels, row_weights, spec: as :func:`kd_loss_forward_cuda`; weighting, space, sharpness,
            weights: as :func:`fuse_experts_cuda`.

    Returns:
        (row_loss fp32 [N], alpha fp32 [N, K], entropy fp32 [N, K], stats fp32 [N, kFusedRowStats]).
    """
    labels, row_weights = _row_inputs(labels, row_weights)
    weights = None if weights is None else weights.to(torch.float32).contiguous()
    with torch.cuda.device(student.device):
        return _module().fused_experts_kd_forward(
            _unit_columns(student), _unit_columns(experts), labels, row_weights, *_loss_args(spec),
            WEIGHTING_CODES[weighting], SPACE_CODES[space], float(sharpness), weights, _stream(student.device))


def fused_experts_kd_backward_cuda(student, experts, labels, row_weights, alpha, stats, scale, spec, space,
                                   need_grad_student, need_grad_experts):
    """fused_experts_kd_loss backward on kdengine._C: the gradients of Σ_rows scale · row_loss (α constant).

    Args:
        student, experts, labels, row_weights, spec, space: as given to the forward; alpha, stats: its
            outputs. scale: fp32 device tensor, 0-d or [N], dL/d(row_loss).

    Returns:
        (grad_student [N, V] | None, grad_experts [K, N, V] | None) in the logits' dtype, computed in fp32
        with ``scale`` in and rounded once.
    """
    labels, row_weights = _row_inputs(labels, row_weights)
    with torch.cuda.device(student.device):
        return _module().fused_experts_kd_backward(
            _unit_columns(student), _unit_columns(experts), labels, row_weights, alpha.contiguous(), stats,
            scale.to(torch.float32).contiguous(), *_loss_args(spec), SPACE_CODES[space], bool(need_grad_student),
            bool(need_grad_experts), _stream(student.device))


def _batch_indices(input_ids, attention_mask, experts):
    ids = input_ids.to(torch.int64).contiguous()
    mask = attention_mask.to(torch.int64).contiguous()
    experts = None if experts is None else experts.to(torch.int64).contiguous()
    return ids, mask, experts


def expert_batch_embed_cuda(input_ids, weight, prompts, attention_mask, experts, placement):
    """expert_batch_embed forward on kdengine._C.

    Args:
        input_ids: [B, L] integer; weight: [Vocab, H] CUDA fp32/bf16/fp16; prompts: [K, P, H] float
        (cast to the weight's dtype); attention_mask: [B, L] integer/bool 0/1; experts: None, [B] or
        [B, k] integer; placement: prepend | append.

    Returns:
        (inputs_embeds [R, P+L, H] in the weight's dtype, attention_mask [R, P+L] in the dtype of
        ``attention_mask``).
    """
    ids, mask, experts = _batch_indices(input_ids, attention_mask, experts)
    prompts = prompts.detach().to(weight.dtype).contiguous()
    with torch.cuda.device(weight.device):
        embeds, out_mask = _module().expert_batch_embed_forward(
            ids, _unit_columns(weight), prompts, mask, experts, PLACEMENT_CODES[placement],
            _stream(weight.device))
    return embeds, out_mask.to(attention_mask.dtype)


def expert_batch_embed_backward_cuda(grad_embeds, input_ids, attention_mask, experts, num_experts, placement,
                                     weight_requires_grad, vocab):
    """expert_batch_embed backward on kdengine._C (deterministic: fixed order, no atomics).

    Args:
        grad_embeds: [R, P+L, H] CUDA gradient of the embeddings (the weight's dtype).
        input_ids, attention_mask, experts, placement: as in the forward. num_experts: K.
        weight_requires_grad: also compute the weight gradient. vocab: rows of the weight.

    Returns:
        (grad_prompts fp32 [K, P, H], grad_weight fp32 [Vocab, H] | None).
    """
    ids, mask, experts = _batch_indices(input_ids, attention_mask, experts)
    with torch.cuda.device(grad_embeds.device):
        return _module().expert_batch_embed_backward(
            _unit_columns(grad_embeds), ids, mask, experts, int(num_experts), PLACEMENT_CODES[placement],
            bool(weight_requires_grad), int(vocab), _stream(grad_embeds.device))
