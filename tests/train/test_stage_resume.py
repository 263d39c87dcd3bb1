"""SIGKILL at a random step of every stage of a PEE-KD run with its no_kd and vanilla_kd baselines
(teacher, the no_kd student, the vanilla_kd student, experts, selector, the PEE-KD student), resume
with --resume_from_checkpoint last: the stage continues from its checkpoint (or starts again when
killed before its first one), the stages before it are skipped, and the run ends with exactly the
metrics of an uninterrupted run (each stage seeds itself from the run seed and its name, so
skipping the finished ones changes nothing).

The kill step is drawn per stage from KDENGINE_TEST_SEED (default 0): set it to kill elsewhere.
Step 0 kills as soon as the stage has begun, before its first checkpoint; the experts stage is
also always killed there (the case where a stage restarts after skipped stages)."""

import os
import random
import signal
import subprocess
import time
import zlib

import pytest

from kdengine.train import checkpoint
from tests.train import PYTHON, REPO, metrics_rows, read_json, small_args, subprocess_env

# 12 optimizer steps in every stage, a checkpoint every 2: the kill follows the checkpoint of a
# step drawn from KILL_STEPS, at least 4 steps before the stage ends (0: before the first one).
RUN = dict(method="pee_kd", synthetic_num_train=96, per_device_train_batch_size=8, num_train_epochs=1,
           teacher_num_train_epochs=1, expert_num_train_epochs=1, selector_num_train_epochs=1, num_experts=2,
           num_virtual_tokens=2, save_strategy="steps", save_steps=2, save_total_limit="None", logging_steps=2,
           compare_baselines=True)
KILL_STEPS = (0, 2, 4, 6, 8)
# stage -> (directory of its checkpoints, what exists once it began, what exists once it finished),
# relative to output_dir
STAGES = {"teacher": ("stages/teacher", "stages/teacher", "teacher"),
          "no_kd": ("baselines/no_kd", "baselines/no_kd", "baselines/no_kd/train_results.json"),
          "vanilla_kd": ("baselines/vanilla_kd", "baselines/vanilla_kd", "baselines/vanilla_kd/train_results.json"),
          "experts": ("stages/experts", "stages/experts", "experts"),
          "selector": ("stages/selector", "stages/selector", "selector"),
          "pee_kd": (".", "selector", "train_results.json")}
STUDENT_DIRS = (".", "baselines/no_kd", "baselines/vanilla_kd")


def _command(output_dir, **extra):
    return [PYTHON, "-m", "kdengine.train", *small_args(output_dir, **{**RUN, **extra})]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    subprocess.run(_command(out), cwd=REPO, env=subprocess_env(), check=True, capture_output=True, timeout=900)
    return out


def _reached(work, began, target) -> bool:
    if target == 0:
        return began.exists()
    return any(step >= target for step, _ in checkpoint.list_checkpoints(str(work)))


@pytest.mark.slow
@pytest.mark.parametrize("stage,target", [(stage, None) for stage in STAGES] + [("experts", 0)])
def test_a_run_killed_at_a_random_step_of_any_stage_resumes_exactly(stage, target, uninterrupted, tmp_path):
    env, killed = subprocess_env(), tmp_path / "killed"
    if target is None:
        target = random.Random(zlib.crc32(stage.encode()) + int(os.environ.get("KDENGINE_TEST_SEED", "0"))) \
            .choice(KILL_STEPS)
    work, began, finished = (killed / part for part in STAGES[stage])
    proc = subprocess.Popen(_command(killed), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while not _reached(work, began, target):
            assert proc.poll() is None, f"the run ended before the {stage} stage reached step {target}"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not finished.exists(), f"the {stage} stage finished before the kill at step {target}"
    saved = checkpoint.list_checkpoints(str(work))
    step = saved[-1][0] if saved else 0

    if saved:
        refused = subprocess.run(_command(killed), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert refused.returncode == 2 and "holds checkpoints of an unfinished run" in refused.stderr

    resumed = subprocess.run(_command(killed, resume_from_checkpoint="last"), cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    if saved:
        assert f"resumed from {os.path.normpath(work / f'checkpoint-{step}')} at step {step}" in resumed.stdout

    full, why = uninterrupted, f"killed in {stage} after step {step}"
    for run_dir in STUDENT_DIRS:
        assert read_json(killed / run_dir / "eval_results.json") == read_json(full / run_dir / "eval_results.json"), why
        assert metrics_rows(killed / run_dir / "metrics.jsonl") == metrics_rows(full / run_dir / "metrics.jsonl"), why
    for name in ("teacher", "experts", "selector"):
        assert metrics_rows(killed / "stages" / name / "metrics.jsonl") == \
            metrics_rows(full / "stages" / name / "metrics.jsonl"), why
        done_killed, done_full = read_json(killed / name / "stage_complete.json"), read_json(full / name / "stage_complete.json")
        assert (done_killed["train_loss"], done_killed["global_step"]) == \
            (done_full["train_loss"], done_full["global_step"]), why
        assert not checkpoint.list_checkpoints(str(killed / "stages" / name)), "a finished stage keeps no checkpoints"
    report = {k: v.get("eval_accuracy") for k, v in read_json(killed / "teacher_results.json").items()}
    assert report == {k: v.get("eval_accuracy") for k, v in read_json(full / "teacher_results.json").items()}, why
