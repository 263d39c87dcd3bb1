"""Tests of ``python -m kdengine.train``: shared small-run options (tiny models, synthetic data)."""

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
