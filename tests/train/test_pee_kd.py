"""PEE-KD specifics: the uncertainty weighting, the selector's features and targets, and the method's variants."""

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from kdengine.methods.pee_kd import PEEKD, PEEKDOptions, uncertainty_weights
from kdengine.methods.selector import (
    TIE_BREAK,
    ExpertSelector,
    disagreement,
    expert_losses,
    expert_scores,
    soft_targets,
)
from kdengine.data.synthetic import make_synthetic_task
from kdengine.runtime import ExpertRuntime
from kdengine.train.__main__ import main
from tests.train import small_args


def _method(weighting_loss: str, **options) -> PEEKD:
    return PEEKD(SimpleNamespace(options=PEEKDOptions(expert_weighting_loss=weighting_loss, **options)))


@pytest.mark.parametrize("temperature", [0.2, 1.0])
def test_uncertainty_weighting_is_a_softmax_over_expert_certainty(temperature):
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 4, requires_grad=True)                 # K=3 experts, B=6, C=4
    labels = torch.tensor([0, 1, 2, 3, 0, -100])
    loss, got_certainty, weights = _method("uncertainty", uncertainty_temperature=temperature)._expert_loss(
        logits, labels)
    probs = logits.detach().softmax(-1)
    valid = labels != -100
    certainty = torch.stack([((probs[k].argmax(-1) == labels) & valid).float().mul(probs[k].max(-1).values).sum()
                             / valid.sum() for k in range(3)])
    torch.testing.assert_close(got_certainty, certainty)
    torch.testing.assert_close(weights, (certainty / temperature).softmax(0))
    ce = torch.stack([F.cross_entropy(logits[k], labels, ignore_index=-100) for k in range(3)])
    torch.testing.assert_close(loss, (weights * ce).sum())
    (grad,) = torch.autograd.grad(loss, logits)                        # weights are constants
    want = torch.autograd.grad((weights.detach() * ce).sum(), logits)[0]
    torch.testing.assert_close(grad, want)


def test_plain_averaging_switch():
    logits = torch.randn(4, 5, 3)
    labels = torch.randint(0, 3, (5,))
    loss, _, weights = _method("none")._expert_loss(logits, labels)
    torch.testing.assert_close(weights, torch.full((4,), 0.25))
    ce = torch.stack([F.cross_entropy(logits[k], labels) for k in range(4)])
    torch.testing.assert_close(loss, ce.mean())


def test_uncertainty_weights_move_at_the_default_and_the_paper_form_is_near_uniform():
    """Certainties 0.78-0.85 (what the experts reach on the embedded task): the paper's softmax(u)
    gives 0.242-0.260 whatever the experts do; the default temperature separates them."""
    certainty = torch.tensor([0.78, 0.80, 0.83, 0.85])
    paper = uncertainty_weights(certainty, 1.0)
    torch.testing.assert_close(paper, certainty.softmax(0))
    assert 0.24 < paper.min() < paper.max() < 0.261
    default = uncertainty_weights(certainty, PEEKDOptions().uncertainty_temperature)
    assert default.max() / default.min() > 1.4                        # e^(0.07 / 0.2) ≈ 1.42 (paper: 1.07)
    assert default.max() - default.min() > 4 * (paper.max() - paper.min())
    assert default.argsort().tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="uncertainty_temperature"):
        PEEKDOptions(uncertainty_temperature=0.0).validate()


def test_selector_soft_targets_and_disagreement():
    logits = torch.tensor([[[3.0, 0.0], [0.0, 1.0]],
                           [[2.0, 0.0], [1.0, 0.0]],
                           [[1.0, 0.0], [0.0, 2.0]]])                  # [K=3, B=2, C=2]
    labels = torch.tensor([0, 1])
    ce = expert_losses(logits, labels)
    want = torch.stack([F.cross_entropy(logits[k], labels, reduction="none") for k in range(3)], -1)
    torch.testing.assert_close(ce, want)
    targets = soft_targets(logits, labels, 0.1)
    torch.testing.assert_close(targets, (-want / 0.1).softmax(-1))
    assert targets.argmax(-1).tolist() == [0, 2]                      # the lowest loss
    assert (soft_targets(logits, labels, 100.0) - 1 / 3).abs().max() < 0.01
    # Example 0: all experts say 0; example 1: expert 1 says 0, the others 1.
    assert disagreement(logits, labels).tolist() == [0.0, 1.0]
    tokens = torch.zeros(2, 1, 3, 2)                                  # [K=2, B=1, L=3, C=2]
    tokens[0, 0, :, 0] = 1.0
    tokens[1, 0, 0, 1] = 1.0                                         # differs at token 0 only
    tokens[1, 0, 1:, 0] = 1.0
    assert disagreement(tokens, torch.tensor([[0, 0, -100]])).tolist() == [0.5]


def test_selector_target_prefers_correct_and_confident_then_closest():
    # Example 0: experts 1 and 2 are right, 2 more confident. Example 1: nobody is right; expert 0
    # gives the true label the most probability.
    logits = torch.tensor([[[0.0, 1.0], [0.0, 0.5]],
                           [[2.0, 0.0], [0.0, 3.0]],
                           [[4.0, 0.0], [0.0, 6.0]]])                  # [K=3, B=2, C=2]
    labels = torch.tensor([0, 0])
    scores = expert_scores(logits, labels)
    assert scores.shape == (2, 3)
    assert scores.argmax(-1).tolist() == [2, 0]
    p = logits.softmax(-1)
    torch.testing.assert_close(scores[0, 1], p[1, 0, 0] + TIE_BREAK * p[1, 0, 0])


def test_selector_token_scores_average_over_labelled_tokens():
    logits = torch.randn(2, 3, 5, 4)
    labels = torch.randint(0, 4, (3, 5))
    labels[:, -2:] = -100
    full = expert_scores(logits, labels)
    cut = expert_scores(logits[:, :, :3], labels[:, :3])
    torch.testing.assert_close(full, cut)


@pytest.mark.parametrize("layers", [None, 2])
def test_backbone_selector_save_load_roundtrip(tmp_path, layers):
    torch.manual_seed(0)
    selector = ExpertSelector(8, num_experts=3, hidden_size=16, layers=layers)
    features = torch.randn(4, 8)
    selector.save_pretrained(tmp_path)
    loaded = ExpertSelector.from_pretrained(tmp_path)
    assert loaded.features == "backbone" and loaded.embed is None and loaded.layers == layers
    torch.testing.assert_close(loaded(features), selector(features))


def test_selector_layers_run_only_the_first_layers_of_the_backbone(tmp_path):
    """backbone_features(layers=n) is the full forward's n-th hidden [CLS] state, computed without the
    later layers (a later layer that would fail is never reached), and the layer list is restored."""
    from kdengine.methods.selector import backbone_features
    from kdengine.models import AUTO_CLASSES
    from kdengine.tiny_models import build_tiny_models

    teacher, _ = build_tiny_models(str(tmp_path), task="sequence_classification", label_names=["a", "b"],
                                   vocab="good bad movie the".split())
    model = AUTO_CLASSES["sequence_classification"].from_pretrained(teacher).eval()
    total = model.config.num_hidden_layers
    ids, mask = torch.randint(5, 9, (3, 6)), torch.ones(3, 6, dtype=torch.long)
    every = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    torch.testing.assert_close(backbone_features(model, ids, mask), every[-1][:, 0])
    stack = model.base_model.encoder.layer
    last = stack[-1].forward
    stack[-1].forward = lambda *a, **k: (_ for _ in ()).throw(AssertionError("the last layer ran"))
    torch.testing.assert_close(backbone_features(model, ids, mask, layers=1), every[1][:, 0])
    assert model.base_model.encoder.layer is stack and len(stack) == total
    stack[-1].forward = last
    with pytest.raises(ValueError, match=rf"selector_layers={total + 1} must be in \[1, {total}\]"):
        backbone_features(model, ids, mask, layers=total + 1)
    with pytest.raises(ValueError, match="selector_layers=1 needs selector_features backbone"):
        PEEKDOptions(selector_layers=1, selector_features="embeddings").validate()


def test_selector_save_load_roundtrip(tmp_path):
    torch.manual_seed(0)
    selector = ExpertSelector(torch.randn(50, 8), num_experts=3, hidden_size=16)
    ids = torch.randint(0, 50, (4, 7))
    mask = torch.ones_like(ids)
    mask[0, 3:] = 0
    selector.save_pretrained(tmp_path)
    loaded = ExpertSelector.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded(ids, mask), selector(ids, mask))
    # Padding is masked out of the max-pool: changing a padded token changes nothing.
    ids2 = ids.clone()
    ids2[0, 5] = (ids2[0, 5] + 1) % 50
    torch.testing.assert_close(selector(ids2, mask), selector(ids, mask))


@pytest.mark.parametrize("flags", [
    dict(teacher_top_k=1, fusion_space="prob", expert_weighting="confidence", selector_features="embeddings"),
    dict(teacher_top_k=2, selector_layers=1),
    dict(prompt_kind="prompt", selector="none", expert_weighting_loss="none", expert_weighting="uniform"),
], ids=["routed-top1-prob-embeddings", "routed-top2-selector-weights-1-layer", "input-prompts-no-selector"])
def test_pee_kd_variants_run_and_report(tmp_path, flags):
    out = tmp_path / "run"
    assert main(small_args(out, method="pee_kd", num_experts=3, num_virtual_tokens=2,
                           expert_num_train_epochs=1, selector_num_train_epochs=1, **flags)) == 0
    report = json.loads((out / "teacher_results.json").read_text())
    rows = {"expert_0", "expert_1", "expert_2", "uniform_fusion", "oracle_routed"}
    assert rows <= set(report)
    assert ("selector_routed" in report) == (flags.get("selector", "learned") == "learned")
    for name in rows:
        assert 0.0 <= report[name]["eval_accuracy"] <= 1.0
    if "selector_routed" in report:
        routed = report["selector_routed"]
        best = routed["best_single_expert"]
        assert routed["best_single_expert_eval_accuracy"] == report[f"expert_{best}"]["eval_accuracy"]
        assert routed["routing_chance"] == pytest.approx(1 / 3)
        assert 0.0 <= routed["eval_routing_accuracy"] <= 1.0
        assert 0 <= routed["disagreement_examples"] <= 32
        assert 0.0 <= routed["eval_routing_accuracy_on_disagreement"] <= 1.0
        # The runtime on the saved run reproduces the evaluation's routed teacher.
        validation = make_synthetic_task(seed=42, n_train=96, n_validation=32, n_test=0)
        preds = ExpertRuntime.from_pretrained(str(out)).predict([ex["text"] for ex in validation.validation])
        hits = [p.label == validation.label_names[ex["label"]] for p, ex in zip(preds, validation.validation)]
        assert sum(hits) / len(hits) == pytest.approx(routed["eval_accuracy"])
    assert (out / "experts" / "stage_complete.json").is_file()
    assert json.loads((out / "eval_results.json").read_text())["eval_accuracy"] >= 0.0


def test_selector_layers_beyond_the_teacher_are_refused_before_work(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(small_args(out, method="pee_kd", selector_layers=99)) == 2
    assert "selector_layers=99: the teacher" in capsys.readouterr().err
    assert not (out / "teacher").exists() and not (out / "stages").exists()


def test_student_step_reads_logits_in_their_dtype(monkeypatch):
    """The teacher and loss step of the student stage give the kernels the bf16 expert and student
    logits as they are: no fp32 copy of the [K, N, C] expert logits nor of the student's (each would
    be a full extra pass and buffer), and the reported CE equals float64 cross-entropy."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from tests.conftest import require_backend

    require_backend("triton")
    k, n, c = 3, 6, 5
    method = PEEKD(SimpleNamespace(options=PEEKDOptions(num_experts=k, selector="none")))
    method.ctx = SimpleNamespace(args=SimpleNamespace(kernel_backend="triton"))
    expert_logits = (torch.randn(k, n, c) * 3).bfloat16()
    monkeypatch.setattr(method, "_expert_logits", lambda batch, experts=None: expert_logits)
    student = (torch.randn(n, c) * 3).bfloat16().requires_grad_()
    labels = torch.tensor([0, 1, -100, 3, 4, 2])

    class Upcasts(TorchDispatchMode):
        seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            src = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if (src is not None and src.dtype == torch.bfloat16 and isinstance(out, torch.Tensor)
                    and out.dtype == torch.float32 and out.numel() >= n * c):
                self.seen.append((func, tuple(out.shape)))
            return out

    with Upcasts():
        teacher = method.teacher_outputs({"input_ids": None, "attention_mask": None, "labels": labels})
        loss, parts = method.student_loss(SimpleNamespace(logits=student), {"labels": labels}, teacher)
    assert teacher["expert_logits"] is expert_logits
    assert Upcasts.seen == [], f"fp32 copies of bf16 logits: {Upcasts.seen}"
    want = F.cross_entropy(student.detach().double(), labels, ignore_index=-100)
    torch.testing.assert_close(parts["ce_loss"].double(), want, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert student.grad.dtype == torch.bfloat16


def test_a_trainable_backbone_is_saved_and_reloaded_with_its_experts(tmp_path):
    """teacher_backbone: trainable trains the backbone with the prompts: the experts stage keeps it
    (backbone.safetensors); reusing the finished stage and the runtime load it, not the fine-tuned
    teacher."""
    import safetensors.torch

    from kdengine.methods.pee_kd import BACKBONE_FILE, EXPERTS
    from kdengine.models import load_for_task

    out = tmp_path / "run"
    assert main(small_args(out, method="pee_kd", num_experts=2, num_virtual_tokens=2, expert_num_train_epochs=1,
                           expert_learning_rate=0.02, selector="none", teacher_backbone="trainable")) == 0
    saved = safetensors.torch.load_file(str(out / EXPERTS / BACKBONE_FILE))
    teacher, _ = load_for_task(str(out / "teacher"), "sequence_classification", ["negative", "positive"],
                               what="teacher")
    assert any(not torch.equal(saved[k], v) for k, v in teacher.state_dict().items() if k in saved)

    method = PEEKD.__new__(PEEKD)
    method.options = PEEKDOptions(teacher_backbone="trainable")
    method.ctx = SimpleNamespace(teacher=teacher, args=SimpleNamespace(kernel_backend="torch"),
                                 device=torch.device("cpu"), log=lambda _: None)
    stage = method.load_stage(EXPERTS, str(out / EXPERTS), None)
    loaded = stage.modules[EXPERTS].model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in saved.items())
    served = ExpertRuntime.from_pretrained(str(out)).experts.model.state_dict()      # the runtime too
    assert all(torch.equal(served[k], v) for k, v in saved.items())
    (out / EXPERTS / BACKBONE_FILE).unlink()
    with pytest.raises(ValueError, match=f"has no {BACKBONE_FILE}"):
        method.load_stage(EXPERTS, str(out / EXPERTS), None)
    with pytest.raises(ValueError, match=f"{BACKBONE_FILE} is missing"):
        ExpertRuntime.from_pretrained(str(out))
