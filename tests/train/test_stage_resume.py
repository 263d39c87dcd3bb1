"""SIGKILL in the middle of each stage of a PEE-KD run (teacher, experts, selector, student), resume
with --resume_from_checkpoint last: the stage continues from its checkpoint and the run ends with
exactly the metrics of an uninterrupted run."""

import os
import signal
import subprocess
import time

import pytest

from kdengine.train import checkpoint
from tests.train import PYTHON, REPO, metrics_rows, read_json, small_args, subprocess_env

# 12 optimizer steps in every stage, a checkpoint every 4: a kill lands after step 4 or 8.
RUN = dict(method="pee_kd", synthetic_num_train=96, per_device_train_batch_size=8, num_train_epochs=1,
           teacher_num_train_epochs=1, expert_num_train_epochs=1, selector_num_train_epochs=1, num_experts=2,
           num_virtual_tokens=2, save_strategy="steps", save_steps=4, save_total_limit=None, logging_steps=2)


def _command(output_dir, **extra):
    return [PYTHON, "-m", "kdengine.train", *small_args(output_dir, **{**RUN, **extra})]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    subprocess.run(_command(out), cwd=REPO, env=subprocess_env(), check=True, capture_output=True, timeout=900)
    return out


def _stage_dir(out, stage):
    return out if stage == "student" else out / "stages" / stage


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["teacher", "experts", "selector", "student"])
def test_a_run_killed_mid_stage_resumes_that_stage(stage, uninterrupted, tmp_path):
    env, killed = subprocess_env(), tmp_path / "killed"
    proc = subprocess.Popen(_command(killed), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while not checkpoint.list_checkpoints(str(_stage_dir(killed, stage))):
            assert proc.poll() is None, f"the run ended before the {stage} stage wrote a checkpoint"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    final = killed / ("eval_results.json" if stage == "student" else stage)
    assert not final.exists(), f"the {stage} stage finished before the kill"
    step = checkpoint.list_checkpoints(str(_stage_dir(killed, stage)))[-1][0]

    refused = subprocess.run(_command(killed), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2 and "holds checkpoints of an unfinished run" in refused.stderr

    resumed = subprocess.run(_command(killed, resume_from_checkpoint="last"), cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {_stage_dir(killed, stage) / f'checkpoint-{step}'} at step {step}" in resumed.stdout

    full = uninterrupted
    assert read_json(killed / "eval_results.json") == read_json(full / "eval_results.json")
    assert metrics_rows(killed / "metrics.jsonl") == metrics_rows(full / "metrics.jsonl")
    for name in ("teacher", "experts", "selector"):
        assert metrics_rows(killed / "stages" / name / "metrics.jsonl") == metrics_rows(full / "stages" / name / "metrics.jsonl")
        done_killed, done_full = read_json(killed / name / "stage_complete.json"), read_json(full / name / "stage_complete.json")
        assert (done_killed["train_loss"], done_killed["global_step"]) == (done_full["train_loss"], done_full["global_step"])
        assert not checkpoint.list_checkpoints(str(killed / "stages" / name)), "a finished stage keeps no checkpoints"
    report = {k: v.get("eval_accuracy") for k, v in read_json(killed / "teacher_results.json").items()}
    assert report == {k: v.get("eval_accuracy") for k, v in read_json(full / "teacher_results.json").items()}
