"""MT-BERT (kdengine/methods/mt_bert.py): confidence weights by hand, the fused multi-teacher loss
against per-teacher float64 losses, co-finetuning (one shared head, gradients into every teacher),
a whole run on the embedded task, a run stopped mid co-finetuning and resumed, and bad input
stopped before MT-BERT trains anything."""

import math
import os
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from kdengine import models
from kdengine.config import parse_args
from kdengine.data.synthetic import LABEL_NAMES, synthetic_vocab
from kdengine.methods.base import Stage
from kdengine.options import ConfigError
from kdengine.methods.mt_bert import (CO_FINETUNE, MTBERT, CoFinetunedTeachers, multi_teacher_kd_loss,
                                      teacher_confidence_weights)
from kdengine.reference.kd_loss import kd_loss_reference
from kdengine.tiny_models import build_tiny_models
from kdengine.train.__main__ import main
from kdengine.train.teacher import context
from kdengine.train.trainer import make_accelerator
from tests.tolerances import assert_close
from tests.train import PYTHON, REPO, metrics_rows, read_json, small_args, subprocess_env, tiny_task

SMALL = dict(method="mt_bert", save_strategy="steps", save_steps=2, save_total_limit=None)


# ---------------------------------------------------------------- the losses

def test_confidence_weights_match_hand_computed_values():
    # Row 0 (label 1): teacher 0 gives p_y = 3/4, teacher 1 p_y = 1/4. Row 1 (label 0): 1/2 and 1/2.
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0]],
                           [[math.log(3.0), 0.0], [0.0, 0.0]]])                  # [K=2, N=2, C=2]
    labels = torch.tensor([1, 0])
    ce = torch.tensor([[math.log(4 / 3), math.log(4.0)], [math.log(2.0), math.log(2.0)]])   # [N, K]
    assert_close(teacher_confidence_weights(logits, labels, "inverse_ce"), 1 / (1 + ce), torch.float32)
    # softmax_k(−CE_k) = p_k,y / Σ_j p_j,y
    assert_close(teacher_confidence_weights(logits, labels, "softmax_neg_ce"),
                 torch.tensor([[0.75, 0.25], [0.5, 0.5]]), torch.float32)
    assert torch.equal(teacher_confidence_weights(logits, labels, "none"), torch.ones(2, 2))
    ignored = teacher_confidence_weights(logits, torch.tensor([1, -100]), "inverse_ce")
    assert torch.equal(ignored[1], torch.ones(2))


@pytest.mark.parametrize("divergence", ["soft_ce", "reverse_kl"])
def test_multi_teacher_loss_is_the_weighted_sum_of_per_teacher_losses(divergence):
    k, n, c, t = 3, 6, 5, 2.0
    student = torch.randn(n, c, requires_grad=True)
    teachers = torch.randn(k, n, c) * 2
    labels = torch.tensor([0, 1, -100, 3, 4, 2])
    weights = torch.rand(n, k) + 0.1
    loss = multi_teacher_kd_loss(student, teachers, weights, labels, divergence=divergence, temperature=t,
                                 backend="torch")
    s64 = student.detach().double().requires_grad_()
    want = sum(kd_loss_reference(s64, teachers[i].double(), divergence=divergence, temperature=t, labels=labels,
                                 row_weights=weights[:, i].double(), hard_weight=0.0) for i in range(k))
    assert_close(loss, want, torch.float32, msg="loss")
    loss.backward()
    want.backward()
    assert_close(student.grad, s64.grad, torch.float32, msg="grad student")


# ---------------------------------------------------------------- co-finetuning

@pytest.fixture
def two_teachers(tmp_path):
    """A 4-layer H=128 teacher, a 2-layer H=96 one and a student (tiny, with task heads)."""
    big, student = build_tiny_models(str(tmp_path / "a"), task="sequence_classification", label_names=LABEL_NAMES,
                                     vocab=synthetic_vocab(), seed=0)
    small, _ = build_tiny_models(str(tmp_path / "b"), task="sequence_classification", label_names=LABEL_NAMES,
                                 vocab=synthetic_vocab(), seed=1,
                                 teacher=dict(num_hidden_layers=2, hidden_size=96, intermediate_size=384))
    return big, small, student


def _method(tmp_path, teachers, student_dir, *flags):
    """An MTBERT on the tiny task, built as the trainer builds it (no teacher fine-tuning)."""
    cfg = parse_args(["--method", "mt_bert", "--teacher_model_name_or_path", ",".join(teachers),
                      "--model_name_or_path", student_dir, "--output_dir", str(tmp_path / "run"),
                      "--report_to", "none", *flags])
    _, student, inputs = tiny_task(tmp_path / "task", cfg)
    accelerator = make_accelerator(cfg, str(tmp_path / "run"))
    loaded = [models.freeze(models.load_for_task(t, cfg.task, LABEL_NAMES, what="teacher")[0]) for t in teachers]
    ctx = context(cfg, accelerator, inputs, str(tmp_path / "run"), teachers=loaded, teacher_sources=teachers,
                  log=lambda _: None)
    return MTBERT(ctx), student, inputs


class _Step:
    """The part of the trainer's StepContext the co-finetuning step reads."""

    def __init__(self, stage):
        self.stage, self.modules, self.model = stage, stage.modules, next(iter(stage.modules.values()))


def test_co_finetuning_shares_one_head_and_trains_every_teacher(tmp_path, two_teachers):
    big, small, student_dir = two_teachers
    method, student, inputs = _method(tmp_path, [big, small], student_dir)
    stage = method.build_stage(CO_FINETUNE, student)
    module = stage.modules[CO_FINETUNE]
    assert isinstance(module, CoFinetunedTeachers) and len(module.backbones) == 2
    names = [n for n, _ in module.named_parameters()]
    assert [n for n in names if "classifier" in n] == ["classifier.weight", "classifier.bias"]
    assert [n for n in names if "pooler" in n] == ["pooler.0.weight", "pooler.0.bias"]   # backbones have none
    # The first teacher sets the shared width (128): only the H=96 teacher has a projection.
    assert isinstance(module.projections[0], torch.nn.Identity)
    assert tuple(module.projections[1].weight.shape) == (128, 96)

    batch = inputs.collate_fn([inputs.train_dataset[i] for i in range(4)])
    # Each teacher's logits go through the same head: its gradient gets a share from each teacher.
    for i in range(2):
        module.zero_grad()
        logits, _ = module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        logits[i].sum().backward()
        assert module.classifier.weight.grad.abs().sum() > 0
        other = module.backbones[1 - i]
        assert all(p.grad is None or p.grad.abs().sum() == 0 for p in other.parameters())
    # The stage's loss sends gradients into every parameter of every teacher.
    module.zero_grad()
    loss, logs = method.training_step(_Step(stage), batch)
    loss.backward()
    assert set(logs) == {"ce_teacher_0", "ce_teacher_1"}
    assert loss.item() == pytest.approx(sum(v.item() for v in logs.values()), rel=1e-6)
    for i, backbone in enumerate(module.backbones):
        without = [n for n, p in backbone.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
        assert not without, f"teacher {i}: no gradient in {without[:3]}"


def test_student_head_shared_starts_the_student_from_the_co_finetuned_head(tmp_path, two_teachers):
    big, small, student_dir = two_teachers
    method, student, _ = _method(tmp_path, [big, small], student_dir, "--student_head", "shared",
                                 "--shared_hidden_size", "64")            # the tiny student's width
    co = method.build_stage(CO_FINETUNE, student).modules[CO_FINETUNE]
    with torch.no_grad():                       # a head unlike any initialisation
        for p in [*co.pooler.parameters(), *co.classifier.parameters()]:
            p.copy_(torch.randn_like(p))
    method.co_teachers = co
    method.build_stage("student", student)
    assert torch.equal(student.base_model.pooler.dense.weight, co.pooler[0].weight)
    assert torch.equal(student.base_model.pooler.dense.bias, co.pooler[0].bias)
    assert torch.equal(student.classifier.weight, co.classifier.weight)
    assert torch.equal(student.classifier.bias, co.classifier.bias)


def test_student_head_shared_of_another_width_is_refused_before_co_finetuning(tmp_path, two_teachers):
    big, small, student_dir = two_teachers
    method, student, _ = _method(tmp_path, [big, small], student_dir, "--student_head", "shared")
    with pytest.raises(ConfigError, match="128 wide but the student's pooler is 64"):
        method.build_stage(CO_FINETUNE, student)


# ---------------------------------------------------------------- whole runs

class Stop(Exception):
    """Raised inside co-finetuning to stop a run as a kill would."""


@pytest.fixture(scope="module")
def embedded_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("mt_bert") / "run"
    assert main(small_args(out, **SMALL)) == 0
    return out


def test_the_embedded_run_reports_each_teacher_the_co_finetuned_ones_and_both_students(embedded_run):
    out = embedded_run
    report = read_json(out / "teacher_results.json")
    assert {"teacher", "teacher_1", "co_finetuned_teacher", "co_finetuned_teacher_1", "co_finetuned_mean_logits",
            "mean_logits_student"} <= set(report)
    evaluated = read_json(out / "eval_results.json")
    assert evaluated["eval_mean_logits_accuracy"] == report["mean_logits_student"]["eval_accuracy"]
    rows = [r for r in metrics_rows(out / "metrics.jsonl") if "hidden_loss" in r]
    assert rows and all(r["hidden_loss"] > 0 and r["kd_loss"] > 0 and r["mean_logits_kd_loss"] > 0 for r in rows)
    assert all(0 < r["teacher_weight_0"] <= 1 and 0 < r["teacher_weight_1"] <= 1 for r in rows)
    # One projection per (teacher, student layer): student H=64 to H=128 (teacher 0) and H=96 (teacher 1).
    projections = load_file(out / "modules" / "projections.safetensors")
    assert {k: tuple(v.shape) for k, v in projections.items() if k.endswith("weight")} == {
        "maps.0.0.weight": (128, 64), "maps.0.1.weight": (128, 64),
        "maps.1.0.weight": (96, 64), "maps.1.1.weight": (96, 64)}
    assert os.path.isfile(out / "modules" / "mean_logits.safetensors")
    assert read_json(out / CO_FINETUNE / "stage_complete.json")["global_step"] > 0


def test_a_run_stopped_mid_co_finetuning_resumes_it(embedded_run, tmp_path, monkeypatch):
    out = tmp_path / "run"
    step = MTBERT.training_step

    def stop_at_step_3(self, context, batch):
        if context.stage.name == CO_FINETUNE and context.global_step == 3:
            raise Stop
        return step(self, context, batch)

    monkeypatch.setattr(MTBERT, "training_step", stop_at_step_3)
    with pytest.raises(Stop):
        main(small_args(out, **SMALL))
    monkeypatch.undo()
    assert not (out / CO_FINETUNE).exists()
    assert os.path.isdir(out / "stages" / CO_FINETUNE / "checkpoint-2")
    assert main(small_args(out, **SMALL, resume_from_checkpoint="last")) == 0
    full = embedded_run
    for path in (f"stages/{CO_FINETUNE}/metrics.jsonl", "metrics.jsonl"):
        assert metrics_rows(out / path) == metrics_rows(full / path)
    assert read_json(out / "eval_results.json") == read_json(full / "eval_results.json")


# ---------------------------------------------------------------- bad input, before MT-BERT trains

def _refused(tmp_path, capsys, teachers, student, *flags) -> str:
    out = tmp_path / f"refused-{len(list(tmp_path.glob('refused-*')))}"
    argv = small_args(out, method="mt_bert", teacher_model_name_or_path=",".join(teachers),
                      model_name_or_path=student)
    assert main(argv + list(flags)) == 2
    assert not out.exists()        # refused before any work (Method.check_run): nothing written
    return " ".join(capsys.readouterr().err.split())


def test_one_teacher_is_refused(tmp_path, capsys, two_teachers):
    big, _, student = two_teachers
    assert "method mt_bert distils several teachers; teacher_model_name_or_path gives 1" in \
        _refused(tmp_path, capsys, [big], student)


def test_teachers_with_different_label_sets_are_refused(tmp_path, capsys, two_teachers):
    big, _, student = two_teachers
    other, _ = build_tiny_models(str(tmp_path / "c"), task="sequence_classification", label_names=["bad", "good"],
                                 vocab=synthetic_vocab(), seed=2)
    assert "the teachers have different label sets" in _refused(tmp_path, capsys, [big, other], student)


def test_teachers_with_different_vocabularies_are_refused(tmp_path, capsys, two_teachers):
    big, _, student = two_teachers
    other, _ = build_tiny_models(str(tmp_path / "c"), task="sequence_classification", label_names=LABEL_NAMES,
                                 vocab=synthetic_vocab()[:-3], seed=2)
    assert "tokenizer mismatch" in _refused(tmp_path, capsys, [big, other], student)


def test_a_layer_map_naming_a_missing_layer_is_refused(tmp_path, capsys, two_teachers):
    big, small, student = two_teachers
    message = _refused(tmp_path, capsys, [big, small], student, "--layer_map", "1:2,2:4")
    assert f"layer_map pair 2:4 names layer 4 of teacher 1 ({small}), which has 2 layers" in message
    message = _refused(tmp_path, capsys, [big, small], student, "--layer_map", "3:1")
    assert "layer_map pair 3:1 names student layer 3, but the student has 2 layers" in message
    message = _refused(tmp_path, capsys, [big, small], student, "--layer_map", "1:1;1:1;1:1")
    assert "layer_map gives 3 pair lists for 2 teachers" in message


def test_bad_layer_map_syntax_is_refused_at_parse_time():
    with pytest.raises(ConfigError, match="layer_map must be 'uniform' or pairs 'student:teacher'"):
        parse_args(["--method", "mt_bert", "--layer_map", "1-2"])


def test_a_student_without_hidden_states_is_refused(tmp_path, two_teachers):
    big, small, student_dir = two_teachers
    method, student, _ = _method(tmp_path, [big, small], student_dir)

    class LogitsOnly(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, output_hidden_states=False, **inputs):
            return self.model(**inputs)            # hidden_states stays None

    with pytest.raises(ConfigError, match="the student returns no hidden states"):
        method.build_stage(CO_FINETUNE, LogitsOnly(student))
    # Without the hidden loss the same student is fine.
    method, student, _ = _method(tmp_path, [big, small], student_dir, "--hidden_weight", "0")
    assert isinstance(method.build_stage(CO_FINETUNE, LogitsOnly(student)), Stage)


@pytest.mark.slow
def test_two_processes_run_every_stage(tmp_path, two_teachers):
    """torchrun --nproc_per_node 2 (gloo): co-finetuning of two teachers of different widths, both
    students and the gathered evaluations of the co-finetuned teachers and the averaged-logits student."""
    big, small, student = two_teachers
    out = tmp_path / "two"
    flags = small_args(out, method="mt_bert", per_device_train_batch_size=8, teacher_model_name_or_path=f"{big},{small}",
                       model_name_or_path=student)
    done = subprocess.run([PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
                           "-m", "kdengine.train", *flags],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "processes=2" in done.stdout
    report = read_json(out / "teacher_results.json")
    assert report["co_finetuned_teacher_1"]["eval_samples"] == report["mean_logits_student"]["eval_samples"] == 32
    assert read_json(out / "eval_results.json")["eval_samples"] == 32
    assert set(load_file(out / "modules" / "projections.safetensors")) >= {"maps.0.0.weight", "maps.1.1.weight"}
