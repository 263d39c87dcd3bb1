"""Resume unpickles nothing: a payload planted in any file of a checkpoint never runs; resume either
ignores the file or refuses it with a ValueError naming it (exit code 2 from the command line)."""

import json
import os
import shutil

import pytest
import torch

from kdengine.config import parse_args
from kdengine.methods.baselines import NoKD
from kdengine.train import checkpoint
from kdengine.train.__main__ import main
from kdengine.train.state_file import load_state, save_state
from kdengine.train.teacher import context
from kdengine.train.trainer import Trainer, make_accelerator
from tests.train import small_args, tiny_task

# The pickled layout kdengine once wrote, and what transformers / the HF Trainer write beside a model.
PICKLED_NAMES = ("optimizer.pt", "scheduler.pt", "rng_state_0.pth", "pytorch_model.bin", "training_args.bin")


class _Payload:
    """Unpickling it creates ``marker``: the proof that a loader ran code from a file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def _plant(path, marker):
    torch.save({"state": _Payload(marker)}, path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A no_kd student stage trained 6 steps with checkpoints at 2 and 4 (and 6), and its trainer."""
    root = tmp_path_factory.mktemp("safe")
    out = root / "out"
    cfg = parse_args(small_args(out, method="no_kd", save_strategy="steps", save_steps=2,
                                per_device_train_batch_size=8, save_total_limit=None))
    _, model, inputs = tiny_task(root / "tiny", cfg)
    os.makedirs(out)
    accelerator = make_accelerator(cfg, str(out))
    method = NoKD(context(cfg, accelerator, inputs, str(out)))
    trainer = Trainer(cfg, accelerator, method, method.build_stage("student", model), str(out))
    fresh = dict(trainer.state)
    trainer.train()
    return trainer, fresh, str(out / "checkpoint-4")


def _load(trainer, fresh, directory):
    return checkpoint.load_checkpoint(trainer.accelerator, directory, modules=trainer.modules,
                                      optimizers=trainer.optimizers, schedulers=trainer.schedulers, template=fresh)


def test_the_payload_runs_when_unpickled(tmp_path):
    """The control: the planted file does run code under torch.load(weights_only=False)."""
    marker = tmp_path / "ran"
    _plant(tmp_path / "file.pt", marker)
    torch.load(tmp_path / "file.pt", weights_only=False)
    assert marker.exists()


def test_a_clean_checkpoint_loads(trained):
    trainer, fresh, source = trained
    assert _load(trainer, fresh, source)["global_step"] == 4


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "optimizer.state.safetensors",
                                  "scheduler.state.safetensors", "rng_state_0.state.safetensors",
                                  "trainer_state.json"])
def test_a_payload_in_any_checkpoint_file_is_refused_without_running(name, trained, tmp_path):
    trainer, fresh, source = trained
    assert sorted(os.listdir(source)) == sorted(["config.json", "model.safetensors", "optimizer.state.safetensors",
                                                 "scheduler.state.safetensors", "rng_state_0.state.safetensors",
                                                 "trainer_state.json"]), "a checkpoint file is not covered here"
    copy, marker = tmp_path / "checkpoint-4", tmp_path / "ran"
    shutil.copytree(source, copy)
    _plant(copy / name, marker)
    with pytest.raises(ValueError) as info:
        _load(trainer, fresh, str(copy))
    assert name in str(info.value) or str(copy) in str(info.value)
    assert "\n" not in str(info.value)
    assert not marker.exists()


def test_pickled_files_beside_a_checkpoint_are_never_read(trained, tmp_path):
    trainer, fresh, source = trained
    copy, marker = tmp_path / "checkpoint-4", tmp_path / "ran"
    shutil.copytree(source, copy)
    for name in PICKLED_NAMES:
        _plant(copy / name, marker)
    assert _load(trainer, fresh, str(copy))["global_step"] == 4
    assert not marker.exists()


def test_a_checkpoint_of_the_pickled_layout_is_refused(trained, tmp_path):
    trainer, fresh, source = trained
    copy, marker = tmp_path / "checkpoint-4", tmp_path / "ran"
    shutil.copytree(source, copy)
    for name in os.listdir(copy):
        if name.endswith(".state.safetensors"):
            os.remove(copy / name)
    for name in PICKLED_NAMES[:3]:
        _plant(copy / name, marker)
    with pytest.raises(ValueError, match="old pickled layout .*no longer loads"):
        _load(trainer, fresh, str(copy))
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "foreign structure", "other optimizer", "bad trainer state"])
def test_damaged_files_are_clear_errors(damage, trained, tmp_path):
    trainer, fresh, source = trained
    copy = tmp_path / "checkpoint-4"
    shutil.copytree(source, copy)
    if damage == "truncated":
        data = (copy / "model.safetensors").read_bytes()
        (copy / "model.safetensors").write_bytes(data[: len(data) // 2])
        expected = "model.safetensors"
    elif damage == "foreign structure":
        from safetensors.torch import save_file  # noqa: PLC0415

        save_file({}, copy / "scheduler.state.safetensors",
                  metadata={"format": "kdengine-state-1", "structure": '{"__reduce__": ["os.system", "ls"]}'})
        expected = "scheduler.state.safetensors: malformed state structure"
    elif damage == "other optimizer":
        save_state({"state": {}, "param_groups": []}, str(copy / "optimizer.state.safetensors"))
        expected = "optimizer.state.safetensors does not fit this stage's optimizer"
    else:
        state = json.loads((copy / "trainer_state.json").read_text())
        (copy / "trainer_state.json").write_text(json.dumps({**state, "global_step": "four"}))
        expected = "trainer_state.json: 'global_step' is 'four', expected int"
    with pytest.raises(ValueError, match=expected.replace(".", r"\.")):
        _load(trainer, fresh, str(copy))


def test_state_files_round_trip_every_kind(tmp_path):
    state = {"a": (1, 2.5, None, "x", True), 3: [torch.arange(4), {"b": torch.tensor(1.0)}], "nan": float("inf")}
    save_state(state, str(tmp_path / "s.state.safetensors"))
    loaded = load_state(str(tmp_path / "s.state.safetensors"))
    assert loaded["a"] == (1, 2.5, None, "x", True) and loaded["nan"] == float("inf")
    assert torch.equal(loaded[3][0], torch.arange(4)) and torch.equal(loaded[3][1]["b"], torch.tensor(1.0))


def test_resume_from_a_planted_checkpoint_exits_2_naming_the_file(tmp_path, capsys):
    out, marker = tmp_path / "out", tmp_path / "ran"
    flags = small_args(out, method="no_kd", save_strategy="steps", save_steps=2)
    assert main(flags) == 0
    os.remove(out / "train_results.json")          # as if the run had been killed before its end
    target = checkpoint.latest_checkpoint(str(out))
    _plant(os.path.join(target, "optimizer.state.safetensors"), marker)
    capsys.readouterr()
    assert main(flags + ["--resume_from_checkpoint", target]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]         # progress bars share stderr
    assert last.startswith("kdengine.train: error: ") and "optimizer.state.safetensors" in last
    assert "Traceback" not in err
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["experts", "selector"])
@pytest.mark.parametrize("damage", ["payload", "truncated", "missing key"])
def test_saved_experts_and_selectors_load_only_their_own_files(kind, damage, tmp_path):
    """A method stage's output (PEE-KD's experts/, selector/) is JSON + safetensors: a damaged file is a
    ValueError naming it, a planted payload never runs."""
    from transformers import BertConfig, BertForSequenceClassification  # noqa: PLC0415

    from kdengine.experts import PromptExperts  # noqa: PLC0415
    from kdengine.experts.serialization import CONFIG_NAME, WEIGHTS_NAME  # noqa: PLC0415
    from kdengine.methods.selector import SELECTOR_CONFIG, SELECTOR_WEIGHTS, ExpertSelector  # noqa: PLC0415

    def backbone():
        torch.manual_seed(0)
        return BertForSequenceClassification(BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2,
                                                        num_attention_heads=2, intermediate_size=32))

    saved, marker = tmp_path / kind, tmp_path / "ran"
    if kind == "experts":
        PromptExperts(backbone(), 2, 2, kind="prefix").save_pretrained(str(saved))
        config, weights = CONFIG_NAME, WEIGHTS_NAME
        load = lambda: PromptExperts.from_pretrained(str(saved), backbone())  # noqa: E731
    else:
        ExpertSelector(torch.randn(30, 16), 2, 8).save_pretrained(str(saved))
        config, weights = SELECTOR_CONFIG, SELECTOR_WEIGHTS
        load = lambda: ExpertSelector.from_pretrained(str(saved))  # noqa: E731
    load()                                              # the clean directory loads
    if damage == "payload":
        _plant(saved / weights, marker)
        expected = f"{weights} is not a readable safetensors file"
    elif damage == "truncated":
        (saved / config).write_text((saved / config).read_text()[:20])
        expected = f"{config} is not readable JSON"
    else:
        values = json.loads((saved / config).read_text())
        del values["num_experts"]
        (saved / config).write_text(json.dumps(values))
        expected = "num_experts"
    with pytest.raises(ValueError, match=expected.replace(".", r"\.")):
        load()
    assert not marker.exists()
