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


# ---------------------------------------------------------------- hidden_state_loss

def _hidden_reference(student, teacher, pairs, weights, biases, mask, loss_type):
    """Token by token in float64: Σ_pairs (1 / real tokens) Σ_real tokens d(W s + b, t)."""
    total = torch.zeros((), dtype=torch.float64)
    real = [(b, i) for b in range(mask.shape[0]) for i in range(mask.shape[1]) if mask[b, i]]
    for (s, t), w, bias in zip(pairs, weights, biases):
        for b, i in real:
            p, target = w @ student[s][b, i] + bias, teacher[t][b, i]
            if loss_type == "mse":
                total = total + ((p - target) ** 2).sum() / p.numel() / len(real)
            else:
                total = total + (1 - p.dot(target) / (p.norm() * target.norm())) / len(real)
    return total


@pytest.mark.parametrize("loss_type", ["mse", "cosine"])
def test_hidden_state_loss_matches_a_float64_reference(loss_type):
    b, length, hs, ht = 3, 7, 5, 9
    student = [torch.randn(b, length, hs, requires_grad=True) for _ in range(3)]     # embeddings + 2 layers
    teacher = [torch.randn(b, length, ht) for _ in range(5)]                            # embeddings + 4 layers
    mask = torch.ones(b, length, dtype=torch.long)
    mask[0, 4:], mask[2, 2:] = 0, 0                                                     # padding
    pairs = [(1, 2), (2, 4), (0, 0)]
    projections = torch.nn.ModuleList(torch.nn.Linear(hs, ht) for _ in pairs)
    loss = kdengine.losses.hidden_state_loss(student, teacher, pairs, projections, attention_mask=mask,
                                             loss_type=loss_type)
    s64 = [x.detach().double().requires_grad_() for x in student]
    w64 = [p.weight.detach().double().requires_grad_() for p in projections]
    b64 = [p.bias.detach().double() for p in projections]
    want = _hidden_reference(s64, [t.double() for t in teacher], pairs, w64, b64, mask, loss_type)
    assert loss.dtype == torch.float32
    assert_close(loss, want, torch.float32, msg="loss")
    loss.backward()
    want.backward()
    for i in range(3):
        assert_close(student[i].grad, s64[i].grad, torch.float32, msg=f"grad student layer {i}")
    for p, w in zip(projections, w64):
        assert_close(p.weight.grad, w.grad, torch.float32, msg="grad projection")
    # Padding carries no loss and gets no gradient.
    assert student[1].grad[0, 4:].abs().max() == 0 and student[2].grad[2, 2:].abs().max() == 0


def test_hidden_state_loss_float64_inputs_stay_float64_and_equal_widths_need_no_projection():
    states = [torch.randn(2, 3, 4, dtype=torch.float64) for _ in range(2)]
    loss = kdengine.losses.hidden_state_loss(states, [s + 1.0 for s in states], [(1, 1)])
    assert loss.dtype == torch.float64 and loss.item() == pytest.approx(1.0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(layer_map=[(3, 1)]), r"names student layer 3, but the student has hidden states 0..2"),
    (dict(layer_map=[(1, 7)]), r"names teacher layer 7, but the teacher has hidden states 0..4"),
    (dict(layer_map=[]), "layer_map is empty"),
    (dict(loss_type="l1"), "unknown loss_type 'l1'"),
    (dict(projections=[]), "0 projections for 1 layer pairs"),
    (dict(projections=None), r"projected student state \(2, 3, 4\) does not match the teacher state \(2, 3, 6\)"),
    (dict(attention_mask=torch.ones(2, 4)), r"attention_mask \(2, 4\) must be \[B, L\] = \(2, 3\)"),
    (dict(student_hidden_states=None), "needs both models' hidden_states"),
])
def test_hidden_state_loss_bad_calls_raise_value_error(kwargs, match):
    call = dict(student_hidden_states=[torch.randn(2, 3, 4) for _ in range(3)],
                teacher_hidden_states=[torch.randn(2, 3, 6) for _ in range(5)], layer_map=[(1, 2)],
                projections=[torch.nn.Linear(4, 6)])
    call.update(kwargs)
    with pytest.raises(ValueError, match=match):
        kdengine.losses.hidden_state_loss(**call)


# ---------------------------------------------------------------- attention_score_loss

def _attention_reference(student, teacher, pairs, mask):
    """Per example, loop by loop in float64: Σ_pairs mean over heads and real (q, k) of (s − t)², entries
    <= −100 zeroed on each side."""
    batch, heads, length, _ = student[0].shape
    out = []
    for b in range(batch):
        total = 0.0
        for s, t in pairs:
            acc, count = 0.0, 0
            for h in range(heads):
                for q in range(length):
                    for k in range(length):
                        if mask[b, q] and mask[b, k]:
                            x, y = float(student[s - 1][b, h, q, k]), float(teacher[t - 1][b, h, q, k])
                            x, y = (0.0 if x <= -100 else x), (0.0 if y <= -100 else y)
                            acc += (x - y) ** 2
                            count += 1
            total += acc / count
        out.append(total)
    return torch.tensor(out, dtype=torch.float64)


def test_attention_score_loss_matches_a_float64_reference_with_layer_maps_padding_and_minus_inf():
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    student = [torch.randn(2, 2, 4, 4, dtype=torch.float64) * 3 for _ in range(2)]
    teacher = [torch.randn(2, 2, 4, 4, dtype=torch.float64) * 3 for _ in range(6)]
    for scores in (*student, *teacher):                 # padded keys as an additive mask would leave them
        scores.masked_fill_(mask[:, None, None, :] == 0, float("-inf"))
    student[1][0, 1, 0, 2] = float("-inf")              # a masked real pair on the student side only
    teacher[5][1, 0, 1, 1] = -1e4
    pairs = [(1, 3), (2, 6)]
    want = _attention_reference(student, teacher, pairs, mask)
    leaves = [s.clone().requires_grad_() for s in student]
    rows = kdengine.losses.attention_score_loss(leaves, teacher, pairs, attention_mask=mask, reduction="none")
    assert rows.dtype == torch.float64
    assert_close(rows, want, torch.float64)
    mean = kdengine.losses.attention_score_loss(leaves, teacher, pairs, attention_mask=mask)
    assert_close(mean, want.mean(), torch.float64)
    mean.backward()
    assert all(torch.isfinite(leaf.grad).all() for leaf in leaves)
    assert leaves[1].grad[0, 1, 0, 2] == 0 and leaves[0].grad[0, :, :, 3].abs().sum() == 0


def test_attention_score_loss_without_a_mask_averages_every_pair():
    torch.manual_seed(1)
    student, teacher = [torch.randn(3, 2, 5, 5)], [torch.randn(3, 2, 5, 5)]
    loss = kdengine.losses.attention_score_loss(student, teacher, [(1, 1)])
    assert_close(loss, (student[0] - teacher[0]).pow(2).mean(), torch.float32)


@pytest.mark.parametrize("kwargs, match", [
    (dict(layer_map=[(3, 1)]), r"names student attention layer 3, but the student has attention layers 1..2"),
    (dict(layer_map=[(1, 0)]), r"names teacher attention layer 0, but the teacher has attention layers 1..4"),
    (dict(layer_map=[]), "layer_map is empty"),
    (dict(reduction="sum"), "unknown reduction 'sum'"),
    (dict(attention_mask=torch.ones(2, 4)), r"attention_mask \(2, 4\) must be \[B, L\] = \(2, 3\)"),
    (dict(teacher_scores=[torch.randn(2, 4, 3, 3)] * 4), "differ; both must be"),
])
def test_attention_score_loss_bad_calls_raise_value_error(kwargs, match):
    call = dict(student_scores=[torch.randn(2, 2, 3, 3)] * 2, teacher_scores=[torch.randn(2, 2, 3, 3)] * 4,
                layer_map=[(1, 2)])
    call.update(kwargs)
    with pytest.raises(ValueError, match=match):
        kdengine.losses.attention_score_loss(**call)
