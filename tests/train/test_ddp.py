"""torchrun --nproc_per_node 2 (gloo, CPU) against one process with the same global batch."""

import json
import os
import subprocess

import pytest

from kdengine.data.synthetic import LABEL_NAMES, synthetic_vocab
from kdengine.tiny_models import build_tiny_models
from tests.train import PYTHON, REPO, small_args, subprocess_env


def _dropout_free_tiny_models(directory) -> tuple[str, str]:
    """Tiny models without dropout, so both runs compute the same function of the same batches.

    The teacher's head gets other label names, so it counts as "not trained for this task" and the
    teacher stage fine-tunes it (under DDP too)."""
    teacher, student = build_tiny_models(str(directory), task="sequence_classification",
                                         label_names=LABEL_NAMES, vocab=synthetic_vocab(), seed=3)
    for path in (teacher, student):
        config_path = os.path.join(path, "config.json")
        with open(config_path) as fh:
            config = json.load(fh)
        config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
        if path == teacher:
            config.update(id2label={"0": "LABEL_0", "1": "LABEL_1"}, label2id={"LABEL_0": 0, "LABEL_1": 1})
        with open(config_path, "w") as fh:
            json.dump(config, fh)
    return teacher, student


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    teacher, student = _dropout_free_tiny_models(tmp_path / "models")
    common = dict(method="vanilla_kd", teacher_model_name_or_path=teacher, model_name_or_path=student,
                  synthetic_num_train=128, synthetic_num_validation=64, num_train_epochs=2,
                  teacher_num_train_epochs=1, eval_strategy="epoch", save_strategy="no")
    env = subprocess_env()
    single = subprocess.run([PYTHON, "-m", "kdengine.train",
                             *small_args(tmp_path / "one", per_device_train_batch_size=16, **common)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    double = subprocess.run([PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
                             "-m", "kdengine.train",
                             *small_args(tmp_path / "two", per_device_train_batch_size=8, **common)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert double.returncode == 0, double.stderr[-3000:]
    assert "processes=2" in double.stdout
    assert "[teacher] fine-tuning" in double.stdout and "[teacher] fine-tuning" in single.stdout

    def read(run, name):
        with open(tmp_path / run / name) as fh:
            return json.load(fh)

    one, two = read("one", "eval_results.json"), read("two", "eval_results.json")
    assert one["eval_samples"] == two["eval_samples"] == 64
    assert two["eval_loss"] == pytest.approx(one["eval_loss"], abs=2e-3)
    assert abs(two["eval_accuracy"] - one["eval_accuracy"]) <= 2 / 64
    steps_one, steps_two = read("one", "train_results.json"), read("two", "train_results.json")
    assert steps_one["global_step"] == steps_two["global_step"] == 16
    assert steps_one["train_samples"] == steps_two["train_samples"] == 256
    teacher_one, teacher_two = read("one", "teacher/eval_results.json"), read("two", "teacher/eval_results.json")
    assert teacher_two["eval_loss"] == pytest.approx(teacher_one["eval_loss"], abs=2e-3)


@pytest.mark.slow
def test_two_processes_build_the_embedded_tiny_models_once(tmp_path):
    """No model flags under torchrun: the main process builds the tiny models in a scratch directory
    both processes read (transformers saves on rank 0 only under torch.distributed), then moves them
    into output_dir/tiny_models."""
    done = subprocess.run([PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29547",
                           "-m", "kdengine.train", *small_args(tmp_path / "run", method="vanilla_kd")],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "processes=2" in done.stdout
    for role in ("teacher", "student"):
        assert os.path.isfile(tmp_path / "run" / "tiny_models" / role / "config.json")
    assert os.path.isfile(tmp_path / "run" / "eval_results.json")
