"""The trainer's error messages: each says what was wrong and what to do."""

import math
import os

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from kdengine import models
from kdengine.config import TrainConfig, to_yaml
from kdengine.methods.baselines import NoKD
from kdengine.train.__main__ import main
from tests.train import small_args, tiny_task


def _tiny_bert(num_labels=2, vocab=50, layers=2):
    config = BertConfig(vocab_size=vocab, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=32, num_labels=num_labels)
    return BertForSequenceClassification(config)


def test_label_count_mismatch():
    with pytest.raises(ValueError, match="the teacher has 3 labels but the student has 2"):
        models.check_pair(_tiny_bert(num_labels=3), _tiny_bert(num_labels=2), "sequence_classification")


def test_input_vocabulary_mismatch():
    with pytest.raises(ValueError, match="teacher embeds 60 token ids and the student 50.*same tokenizer"):
        models.check_pair(_tiny_bert(vocab=60), _tiny_bert(vocab=50), "sequence_classification")


def test_student_num_layers_out_of_range():
    with pytest.raises(ValueError, match=r"student_num_layers must be in \[1, 2\]"):
        models.student_from_teacher(_tiny_bert(layers=2), 3)


def test_student_from_teacher_copies_evenly_spaced_layers():
    teacher = _tiny_bert(layers=5)
    student = models.student_from_teacher(teacher, 3)
    assert models.evenly_spaced(5, 3) == [0, 2, 4]
    t, s = teacher.state_dict(), student.state_dict()
    for j, i in enumerate([0, 2, 4]):
        assert torch.equal(s[f"bert.encoder.layer.{j}.output.dense.weight"], t[f"bert.encoder.layer.{i}.output.dense.weight"])
    for key in ("bert.embeddings.word_embeddings.weight", "bert.pooler.dense.weight", "classifier.weight"):
        assert torch.equal(s[key], t[key])


def test_hub_name_without_network(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import: patch the constant
    with pytest.raises(ValueError, match="model 'no-such-org/no-such-model' not found locally and the hub is not "
                                         "reachable; pass a local directory"):
        models.resolve("no-such-org/no-such-model", "teacher_model_name_or_path")


def test_output_dir_with_a_different_config(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.yaml").write_text(to_yaml(TrainConfig(output_dir=str(out), learning_rate=0.5)))
    assert main(small_args(out)) == 2
    err = capsys.readouterr().err
    assert "holds a run with a different config (learning_rate: 0.5 -> 0.002" in err
    assert "--overwrite_output_dir true" in err and "new --output_dir" in err


class _NaNAtStep3(NoKD):
    """Cross-entropy that turns NaN on the third micro-batch."""

    calls = 0

    def student_loss(self, student_outputs, batch, teacher_outputs):
        loss, logs = super().student_loss(student_outputs, batch, teacher_outputs)
        type(self).calls += 1
        return (loss * math.nan if type(self).calls == 3 else loss), logs


def test_nan_loss_names_the_step_and_the_last_good_checkpoint(tmp_path):
    from kdengine.config import parse_args
    from kdengine.train.teacher import context
    from kdengine.train.trainer import NonFiniteLossError, Trainer, make_accelerator

    out = tmp_path / "out"
    cfg = parse_args(small_args(out, method="no_kd", save_strategy="steps", save_steps=2, logging_steps=1,
                                per_device_train_batch_size=8))
    _, model, inputs = tiny_task(tmp_path / "tiny", cfg)
    os.makedirs(out)
    accelerator = make_accelerator(cfg, str(out))
    method = _NaNAtStep3(context(cfg, accelerator, inputs, str(out)))
    with pytest.raises(NonFiniteLossError, match=r"NaN/inf at step 3; last good checkpoint: .*checkpoint-2\b"):
        Trainer(cfg, accelerator, method, method.build_stage("student", model), str(out)).train()
    assert not os.path.exists(out / "checkpoint-4")


def test_a_teacher_at_the_majority_class_level_stops_the_run_and_leaves_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    flags = small_args(out, method="vanilla_kd", teacher_learning_rate=1e-9, synthetic_num_validation=200,
                       teacher_min_margin=0.01)
    assert main(flags) == 2
    err = capsys.readouterr().err
    assert "the fine-tuned teacher did not learn the task: validation accuracy" in err
    assert "at the majority-class level" in err and "--teacher_learning_rate" in err
    assert not out.exists()


def test_a_failed_teacher_in_an_existing_output_dir_removes_only_its_own_stage(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    flags = small_args(out, method="vanilla_kd", teacher_learning_rate=1e-9, synthetic_num_validation=200,
                       teacher_min_margin=0.01)
    assert main(flags) == 2
    assert "did not learn the task" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"
    assert not (out / "teacher").exists() and not (out / ".tmp-teacher").exists()


def test_majority_baseline_matches_a_constant_predictor():
    from types import SimpleNamespace  # noqa: PLC0415

    from kdengine.train.teacher import majority_baseline  # noqa: PLC0415

    cfg = TrainConfig(task="sequence_classification")
    inputs = SimpleNamespace(eval_dataset=[{"labels": label} for label in (0, 1, 1, 2, 1, 0, -100)],
                             label_names=["a", "b", "c"])
    assert majority_baseline(cfg, inputs) == (0.5, "b")
    ner = TrainConfig(task="token_classification")
    tags = SimpleNamespace(eval_dataset=[{"labels": [-100, 0, 1, 0]}, {"labels": [0, 0, -100]}],
                           label_names=["O", "B-PER", "I-PER"])
    score, label = majority_baseline(ner, tags)
    # Always "O" finds no entity (F1 0); always "B-PER" predicts 5 entities, 1 of them right: F1 = 1/3.
    assert label == "B-PER" and score == pytest.approx(1 / 3)
