"""examples/custom_method.py: a method from outside the package, with its own options and module."""

import json
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from kdengine.config import parse_args
from kdengine.options import ConfigError
from kdengine.train.__main__ import main
from tests.train import PYTHON, REPO, small_args, subprocess_env

METHOD = "examples.custom_method:HiddenStateKD"


def test_the_documented_command_runs_it_with_its_option(tmp_path):
    out = tmp_path / "run"
    command = [PYTHON, "-m", "kdengine.train", "--method", METHOD, "--hidden_weight", "0.5",
               *small_args(out, save_strategy="steps", save_steps=2, save_total_limit=None)]
    done = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    config = (out / "config.yaml").read_text()
    assert f"method: {METHOD}" in config and "hidden_weight: 0.5" in config
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    train_rows = [r for r in rows if "hidden_loss" in r]
    assert train_rows and all(r["hidden_loss"] > 0 and r["kd_loss"] >= 0 for r in train_rows)
    # The projection trained (step 2 differs from the end), is in every checkpoint and saved at the end.
    final = load_file(out / "modules" / "projection.safetensors")
    early = load_file(out / "checkpoint-2" / "projection.safetensors")
    assert final["weight"].shape == (128, 64)               # tiny teacher H=128, student H=64
    assert not torch.equal(final["weight"], early["weight"])
    assert json.loads((out / "eval_results.json").read_text())["eval_accuracy"] >= 0.0


def test_its_options_are_checked_and_refused_elsewhere(capsys):
    assert parse_args(["--method", METHOD, "--hidden_weight", "2"]).options.hidden_weight == 2.0
    assert parse_args(["--method", METHOD]).options.kd_temperature == 4.0        # inherited KD options
    with pytest.raises(ConfigError, match=r"hidden_weight must be >= 0, got -1.0 \(an option of method "
                                          r"examples.custom_method:HiddenStateKD\)"):
        parse_args(["--method", METHOD, "--hidden_weight", "-1"])
    # refused for vanilla_kd: named as built-ins' option where one declares it (mt_bert), unknown otherwise
    with pytest.raises(ConfigError, match=r"option --hidden_weight( in the command line belongs to methods? "
                                          r"[a-z_, ]+, not to the method of this run, vanilla_kd|$)"):
        parse_args(["--method", "vanilla_kd", "--hidden_weight", "1"])
    assert main(["--method", METHOD, "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "options of method examples.custom_method:HiddenStateKD:" in out
    assert "--hidden_weight FLOAT weight of the MSE" in out
