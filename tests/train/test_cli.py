"""Command line and YAML: --help, precedence, unknown keys, bad values (no training here)."""

import dataclasses

import pytest

from kdengine.config import EMBEDDED_DEFAULTS, ConfigError, TrainConfig, parse_args
from kdengine.methods import builtin_methods
from kdengine.methods.baselines import KDLossOptions
from kdengine.methods.pee_kd import PEEKDOptions
from kdengine.options import GENERAL, Schema
from kdengine.train.__main__ import main


def test_help_lists_every_option_with_its_default(capsys):
    assert main(["--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    names = set(GENERAL.fields)
    for cls in builtin_methods().values():
        names |= set(Schema(cls.options_class).fields)
    for name in names:
        assert f"--{name}" in out, name
    assert "options of method vanilla_kd:" in out and "options of method pee_kd:" in out
    sharing = [name for name, cls in builtin_methods().items()
               if "kd_temperature" in Schema(cls.options_class).fields]
    assert {"vanilla_kd", "pee_kd"} <= set(sharing), sharing
    assert f"(default: 4.0; methods {', '.join(sharing)})" in out           # kd_temperature, shared
    assert "(default: 'pee_kd')" in out
    assert "(default: 5e-05; 0.001 on the embedded synthetic task)" in out          # learning_rate
    assert "--config" in out


def test_defaults_are_the_embedded_pee_kd_run():
    cfg = parse_args([])
    assert cfg == dataclasses.replace(TrainConfig(), **EMBEDDED_DEFAULTS, options=PEEKDOptions())
    assert (cfg.learning_rate, cfg.teacher_learning_rate) == (1e-3, 1e-3)
    assert (cfg.method, cfg.compare_baselines, cfg.train_file, cfg.teacher_model_name_or_path) == \
        ("pee_kd", True, None, None)
    assert (cfg.options.kd_divergence, cfg.options.kd_temperature, cfg.options.num_experts) == ("forward_kl", 4.0, 4)


def test_yaml_replaces_defaults_and_flags_override_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("learning_rate: 0.002\nseed: 7\nmethod: pee_kd\nteacher_top_k: 2\nkd_weight: 0.5\nbf16: true\n")
    cfg = parse_args(["--config", str(path), "--seed", "9", "--teacher_top_k", "none", "--bf16", "false"])
    assert cfg.learning_rate == 0.002          # YAML over default
    assert cfg.seed == 9                       # flag over YAML
    assert cfg.options.teacher_top_k is None and cfg.bf16 is False        # a method option: flag over YAML
    assert cfg.options == PEEKDOptions(kd_weight=0.5)
    embedded = dataclasses.replace(TrainConfig(), **EMBEDDED_DEFAULTS)
    changed = {name for name in GENERAL.fields if getattr(cfg, name) != getattr(embedded, name)}
    assert changed == {"learning_rate", "seed"}


def test_real_models_get_the_fine_tuning_defaults_and_explicit_rates_win(tmp_path):
    real = parse_args(["--teacher_model_name_or_path", "some/model", "--student_num_layers", "2"])
    assert (real.learning_rate, real.teacher_learning_rate, real.warmup_ratio) == (5e-5, 5e-5, 0.1)
    assert real.options.expert_learning_rate > 1e-3          # prompt experts keep their own, higher rate
    assert parse_args(["--learning_rate", "2e-4"]).learning_rate == 2e-4          # embedded task, explicit flag
    assert parse_args(["--learning_rate", "2e-4"]).teacher_learning_rate == 1e-3
    path = tmp_path / "run.yaml"
    path.write_text("teacher_learning_rate: 3.0e-4\n")
    assert parse_args(["--config", str(path)]).teacher_learning_rate == 3e-4     # explicit in YAML


def test_bool_flag_without_value_and_resume_spellings():
    assert parse_args(["--fp16"]).fp16 is True
    assert parse_args(["--resume_from_checkpoint", "true"]).resume_from_checkpoint == "last"
    assert parse_args(["--resume_from_checkpoint", "runs/x/checkpoint-8"]).resume_from_checkpoint == \
        "runs/x/checkpoint-8"


def test_unknown_flag_names_the_closest_option():
    with pytest.raises(ConfigError, match=r"unknown option --learning_rat; did you mean 'learning_rate'"):
        parse_args(["--learning_rat", "1e-3"])


def test_unknown_yaml_key_names_the_closest_option(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("kd_temprature: 2.0\n")
    with pytest.raises(ConfigError, match=r"unknown option 'kd_temprature' in .*did you mean 'kd_temperature'"):
        parse_args(["--config", str(path)])


@pytest.mark.parametrize("flags, message", [
    (["--learning_rate", "0"], "learning_rate must be > 0"),
    (["--kd_temperature", "-1"], "kd_temperature must be > 0"),
    (["--num_experts", "0"], "num_experts must be >= 1"),
    (["--num_experts", "2", "--teacher_top_k", "3"],
     r"teacher_top_k=3 must be in \[1, num_experts=2\] \(an option of method pee_kd\)"),
    (["--expert_learning_rate", "0"], r"expert_learning_rate must be > 0, got 0.0 \(an option of method pee_kd\)"),
    (["--prompt_kind", "soft"], "prompt_kind must be one of prompt, prefix"),
    (["--method", "vanilla_kd", "--kd_weight", "0", "--hard_weight", "0"], "kd_weight \\+ hard_weight must be > 0"),
    (["--task", "qa"], "task must be one of"),
    (["--eval_strategy", "sometimes"], "eval_strategy must be one of no, steps, epoch"),
    (["--stages", "teacher,distill"], "unknown stage 'distill'"),
    (["--per_device_train_batch_size", "two"], "per_device_train_batch_size expects int"),
    (["--warmup_ratio", "1.5"], r"warmup_ratio must be in \[0, 1\)"),
    (["--bf16", "--fp16"], "bf16 and fp16 are exclusive"),
    (["--metric_for_best_model", "eval_f1"], "metric_for_best_model='eval_f1' is not computed"),
    (["--report_to", "wandb"], "unknown report_to entry 'wandb'"),
])
def test_bad_values_are_errors_before_any_work(flags, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(flags)


def test_a_method_option_given_to_another_method_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"option --num_experts in the command line belongs to method pee_kd, not "
                                          r"to the method of this run, vanilla_kd"):
        parse_args(["--method", "vanilla_kd", "--num_experts", "2"])
    with pytest.raises(ConfigError, match=r"--kd_temperature .* belongs to methods vanilla_kd, pee_kd, .* no_kd"):
        parse_args(["--method", "no_kd", "--kd_temperature", "2"])
    path = tmp_path / "run.yaml"
    path.write_text("method: pee_kd\nnum_experts: 2\n")
    with pytest.raises(ConfigError, match=r"option 'num_experts' in .*run.yaml belongs to method pee_kd"):
        parse_args(["--config", str(path), "--method", "vanilla_kd"])        # the flag's method wins


def test_shared_options_carry_over_to_the_baselines():
    from kdengine.config import options_for

    cfg = parse_args(["--kd_temperature", "2", "--num_experts", "3"])
    vanilla = options_for(cfg, "vanilla_kd")
    assert vanilla.method == "vanilla_kd" and vanilla.options == KDLossOptions(kd_temperature=2.0)
    assert options_for(cfg, "no_kd").options.__class__.__name__ == "MethodOptions"


@pytest.mark.parametrize("method, message", [
    ("pee", r"unknown method 'pee' \(did you mean 'pee_kd'\?\); built-in methods: no_kd, vanilla_kd, pee_kd, .*, or "
            r"pass package.module:ClassName"),
    ("no_such_package.mod:Thing", r"module 'no_such_package.mod' does not import \(ModuleNotFoundError"),
    ("kdengine.methods.baselines:Missing", r"module 'kdengine.methods.baselines' has no 'Missing'"),
    ("kdengine.methods.baselines:KDLossOptions", r"is not a kdengine.methods.base.Method subclass"),
    ("kdengine.methods.baselines", r"unknown method"),
])
def test_bad_methods_are_errors_before_any_work(method, message, tmp_path, capsys):
    with pytest.raises(ConfigError, match=message):
        parse_args(["--method", method])
    assert main(["--method", method, "--output_dir", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


def test_main_prints_the_error_and_exits_2(capsys, tmp_path):
    assert main(["--kd_temperature", "0", "--output_dir", str(tmp_path / "out")]) == 2
    assert "kdengine.train: error: kd_temperature must be > 0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()     # nothing was written


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        parse_args(["--config", str(tmp_path / "nope.yaml")])


@pytest.mark.parametrize("name", ["sst2", "rte", "conll2003"])
def test_shipped_configs_parse_and_state_their_command(name):
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "..", "configs", f"{name}.yaml")
    with open(path) as fh:
        header = fh.read().split("\nmethod:")[0]
    assert f"python -m kdengine.train --config configs/{name}.yaml" in header
    cfg = parse_args(["--config", path, "--teacher_model_name_or_path", "/models/minilm"])
    assert cfg.method == "pee_kd" and cfg.student_num_layers == 3
    assert cfg.train_file.startswith("../shared/data/")
