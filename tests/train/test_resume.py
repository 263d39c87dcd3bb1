"""SIGKILL mid-run, resume from the last checkpoint: the final metrics equal an uninterrupted run's."""

import os
import signal
import subprocess
import time

import pytest

from kdengine.train import checkpoint
from tests.train import PYTHON, REPO, metrics_rows, read_json, small_args, subprocess_env, untimed

RUN = dict(method="no_kd", synthetic_num_train=192, per_device_train_batch_size=8, num_train_epochs=2,
           save_strategy="steps", save_steps=6, save_total_limit=2, eval_strategy="epoch", logging_steps=3)


def _command(output_dir, **extra):
    return [PYTHON, "-m", "kdengine.train", *small_args(output_dir, **{**RUN, **extra})]


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_same_final_metrics(tmp_path):
    env = subprocess_env()
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(_command(full), cwd=REPO, env=env, check=True, capture_output=True, timeout=600)

    proc = subprocess.Popen(_command(killed), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not checkpoint.list_checkpoints(str(killed)):
            assert proc.poll() is None, "the run ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.02)
        assert proc.poll() is None, "the run finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "eval_results.json").exists()
    last_step = checkpoint.list_checkpoints(str(killed))[-1][0]
    total_steps = read_json(full / "trainer_state.json")["global_step"]
    assert last_step < total_steps

    # An interrupted checkpoint (never renamed) with a later step must be ignored.
    junk = killed / f"{checkpoint.TMP_PREFIX}{total_steps + 5}"
    junk.mkdir(exist_ok=True)
    (junk / "optimizer.pt").write_bytes(b"truncated")
    resumed = subprocess.run(_command(killed, resume_from_checkpoint="last"), cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {killed / f'checkpoint-{last_step}'}" in resumed.stdout

    assert read_json(killed / "eval_results.json") == read_json(full / "eval_results.json")
    state_full, state_killed = read_json(full / "trainer_state.json"), read_json(killed / "trainer_state.json")
    assert untimed(state_killed["log_history"]) == untimed(state_full["log_history"])
    assert state_killed["global_step"] == state_full["global_step"] == total_steps
    assert read_json(killed / "train_results.json")["train_loss"] == read_json(full / "train_results.json")["train_loss"]
    assert metrics_rows(killed / "metrics.jsonl") == metrics_rows(full / "metrics.jsonl")   # no duplicated rows


def test_latest_checkpoint_ignores_incomplete_directories(tmp_path):
    for name in ("checkpoint-4", "checkpoint-12", f"{checkpoint.TMP_PREFIX}20", "checkpoint-16"):
        (tmp_path / name).mkdir()
    for name in ("checkpoint-4", "checkpoint-12"):
        (tmp_path / name / checkpoint.STATE_FILE).write_text("{}")
    # checkpoint-16 has no trainer_state.json: not a complete checkpoint.
    assert checkpoint.latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-12")
    assert checkpoint.resolve_resume("last", str(tmp_path)) == str(tmp_path / "checkpoint-12")
    with pytest.raises(ValueError, match="is not a complete checkpoint"):
        checkpoint.resolve_resume(str(tmp_path / "checkpoint-16"), str(tmp_path))


def test_prune_keeps_the_newest(tmp_path):
    for step in (2, 4, 6, 8):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / checkpoint.STATE_FILE).write_text("{}")
    checkpoint.prune(str(tmp_path), 2)
    assert [s for s, _ in checkpoint.list_checkpoints(str(tmp_path))] == [6, 8]


def test_unfinished_checkpoints_are_those_of_the_stages_not_finished(tmp_path):
    from kdengine.train.stages import unfinished_checkpoints  # noqa: PLC0415

    out = tmp_path / "stages" / "run"            # a parent named like the stages directory changes nothing
    for path in ("checkpoint-2", "stages/experts/checkpoint-4", "stages/teacher/checkpoint-2",
                 "baselines/no_kd/checkpoint-6", "baselines/vanilla_kd/checkpoint-2", "baselines/vanilla_kd/checkpoint-4",
                 f"baselines/vanilla_kd/{checkpoint.TMP_PREFIX}6"):
        (out / path).mkdir(parents=True)
        (out / path / checkpoint.STATE_FILE).write_text("{}")
    (out / "teacher").mkdir()
    (out / "teacher" / "stage_complete.json").write_text("{}")           # the teacher stage finished
    (out / "baselines" / "no_kd" / "train_results.json").write_text("{}")  # so did the no_kd student
    assert sorted(os.path.relpath(p, out) for p in unfinished_checkpoints(str(out))) == \
        ["baselines/vanilla_kd/checkpoint-4", "checkpoint-2", "stages/experts/checkpoint-4"]
