"""Tests of ``python -m kdengine.train``: shared small-run options (tiny models, synthetic data)."""

import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def small_args(output_dir, **overrides) -> list[str]:
    """Flags of a seconds-long run: tiny models, 96 synthetic training examples, no TensorBoard. Its
    one-epoch teacher is not expected to beat the majority class: the teacher check is off."""
    options = dict(output_dir=str(output_dir), synthetic_num_train=96, synthetic_num_validation=32,
                   synthetic_num_test=0, per_device_train_batch_size=16, per_device_eval_batch_size=32,
                   num_train_epochs=1, teacher_num_train_epochs=1, logging_steps=2, report_to="none",
                   compare_baselines=False, learning_rate=2e-3, teacher_learning_rate=2e-3,
                   teacher_min_margin=-1)
    options.update(overrides)
    flags = []
    for key, value in options.items():
        flags += [f"--{key}", str(value)]
    return flags


def subprocess_env() -> dict:
    """Environment of a child ``python -m kdengine.train``: one thread (deterministic, no contention)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("KDENGINE_BACKEND", None)
    return env


PYTHON = sys.executable


def read_json(path):
    with open(path) as fh:
        return json.load(fh)


def untimed(rows):
    """Log rows without their wall-clock field (the only one allowed to differ between runs)."""
    return [{k: v for k, v in row.items() if k != "examples_per_second"} for row in rows]


def metrics_rows(path):
    """The untimed rows of a metrics.jsonl."""
    with open(path) as fh:
        return untimed(map(json.loads, fh))


def tiny_task(directory, cfg, n_train: int = 48):
    """(teacher, student, TaskInputs) of the synthetic task with freshly built tiny models (untrained
    teacher, as loaded by the trainer), for tests that drive ``kdengine.train.trainer.Trainer`` directly."""
    from kdengine import models
    from kdengine.data import load_task_data, make_collate_fn, tokenize_split
    from kdengine.data.synthetic import LABEL_NAMES, synthetic_vocab
    from kdengine.tiny_models import build_tiny_models
    from kdengine.train.__main__ import TaskInputs

    teacher_dir, student_dir = build_tiny_models(str(directory), task=cfg.task, label_names=LABEL_NAMES,
                                                 vocab=synthetic_vocab(), seed=0)
    teacher, _ = models.load_for_task(teacher_dir, cfg.task, LABEL_NAMES, what="teacher")
    student, _ = models.load_for_task(student_dir, cfg.task, LABEL_NAMES, what="student")
    tokenizer = models.load_tokenizer(student_dir, "student")
    data = load_task_data({"synthetic": {"n_train": n_train, "n_validation": 8, "n_test": 0}})
    inputs = TaskInputs(LABEL_NAMES, tokenizer, tokenize_split(data.train, tokenizer, cfg.task, 32),
                        tokenize_split(data.validation, tokenizer, cfg.task, 32), make_collate_fn(tokenizer, cfg.task))
    return models.freeze(teacher), student, inputs
