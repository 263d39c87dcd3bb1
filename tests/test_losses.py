"""KDLoss (kdengine/losses.py): both call forms against the float64 reference, shapes, validation."""

from __future__ import annotations

import textwrap

import pytest
import torch

import kdengine.losses
from kdengine.losses import KDLoss
from kdengine.reference.kd_loss import kd_loss_reference
from tests.tolerances import assert_close

OPTIONS = dict(divergence="jsd", jsd_beta=0.3, temperature=2.0, hard_weight=0.4, kd_weight=0.8)


def labels_for(shape, v):
    labels = torch.randint(0, v, shape)
    labels.view(-1)[::3] = -100
    return labels


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_logits_form_matches_reference(reduction):
    b, length, v = 2, 5, 97
    student = (torch.randn(b, length, v) * 3).requires_grad_()
    teacher = torch.randn(b, length, v) * 3
    labels = labels_for((b, length), v)
    loss = KDLoss(reduction=reduction, **OPTIONS)(student, teacher, labels=labels)
    s64 = student.detach().double().reshape(-1, v).requires_grad_()
    want = kd_loss_reference(s64, teacher.double().reshape(-1, v), labels=labels.reshape(-1),
                             reduction=reduction, **OPTIONS)
    assert loss.shape == ((b, length) if reduction == "none" else ())
    assert_close(loss.reshape(-1), want.reshape(-1), torch.float32, msg="loss")
    grad_output = torch.rand(loss.shape) + 0.5
    loss.backward(grad_output)
    want.backward(grad_output.double().reshape(want.shape))
    assert_close(student.grad.reshape(-1, v), s64.grad, torch.float32, msg="grad student")


@pytest.mark.parametrize("teacher_form", ["logits", "head"])
def test_fused_linear_form_matches_reference(teacher_form):
    b, length, h, ht, v = 2, 3, 8, 6, 61
    hidden = torch.randn(b, length, h, requires_grad=True)
    weight = (torch.randn(v, h) * 0.8).requires_grad_()
    labels = labels_for((b, length), v)
    row_weights = torch.rand(b, length) + 0.5
    t_hidden, t_weight = torch.randn(b, length, ht), torch.randn(v, ht)
    teacher = (dict(teacher_logits=t_hidden @ t_weight.T) if teacher_form == "logits"
               else dict(teacher_hidden=t_hidden, teacher_weight=t_weight))
    loss_fn = KDLoss(chunk_size=4, backend="torch", **OPTIONS)
    loss = loss_fn(hidden, labels=labels, row_weights=row_weights, normalizer=5.0, student_weight=weight,
                   **teacher)
    h64 = hidden.detach().double().reshape(-1, h).requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    want = kd_loss_reference(h64 @ w64.T, (t_hidden.double() @ t_weight.double().T).reshape(-1, v),
                             labels=labels.reshape(-1), row_weights=row_weights.double().reshape(-1),
                             normalizer=5.0, **OPTIONS)
    assert_close(loss, want, torch.float32, msg="loss")
    loss.backward()
    want.backward()
    assert_close(hidden.grad.reshape(-1, h), h64.grad, torch.float32, msg="grad hidden")
    assert_close(weight.grad, w64.grad, torch.float32, msg="grad weight")


def test_module_has_no_parameters_and_shows_its_options():
    loss_fn = KDLoss(divergence="tvd", temperature=3.0, reduction="sum")
    assert list(loss_fn.parameters()) == [] and loss_fn.state_dict() == {}
    text = repr(loss_fn)
    assert "divergence='tvd'" in text and "temperature=3.0" in text and "reduction='sum'" in text


@pytest.mark.parametrize("kwargs, match", [
    (dict(divergence="kl"), "unknown divergence"),
    (dict(temperature=0.0), "temperature must be > 0"),
    (dict(jsd_beta=1.5), "jsd_beta must be <= 1"),
    (dict(reduction="avg"), "unknown reduction 'avg'"),
    (dict(chunk_size=0), "chunk_size must be a positive integer"),
])
def test_bad_options_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KDLoss(**kwargs)


def test_bad_calls_raise_value_error():
    loss_fn = KDLoss()
    logits = torch.randn(4, 10)
    with pytest.raises(ValueError, match="teacher_hidden / teacher_weight need the fused path"):
        loss_fn(logits, teacher_hidden=torch.randn(4, 3), teacher_weight=torch.randn(10, 3))
    with pytest.raises(ValueError, match="teacher_logits .* is required"):
        loss_fn(logits)
    with pytest.raises(ValueError, match="hard_weight != 0 needs labels"):
        KDLoss(hard_weight=1.0)(logits, logits)
    with pytest.raises(ValueError, match="student_hidden has H=5 but student_weight has H=4"):
        loss_fn(torch.randn(4, 5), logits, student_weight=torch.randn(10, 4))


def test_docstring_example_runs():
    source = kdengine.losses.__doc__.split("Example::", 1)[1]
    exec(compile(textwrap.dedent(source), "kdengine.losses example", "exec"), {})
