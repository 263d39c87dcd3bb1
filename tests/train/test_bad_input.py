"""The catalogue of bad inputs to ``python -m kdengine.train``: every kind is refused before any
work, from the command line (exit code 2, one line ``kdengine.train: error: ...`` naming what was
wrong and what was expected, no traceback) and from the API (``run(parse_args(argv))`` raises a
ValueError with the same message), and output_dir is left exactly as it was found."""

import json
import os
import re
import shutil
import subprocess
import tempfile

import pytest
import torch

from kdengine.config import parse_args
from kdengine.data.synthetic import LABEL_NAMES, synthetic_vocab
from kdengine.ops._backends import availability
from kdengine.tiny_models import build_tiny_models
from kdengine.train import checkpoint
from kdengine.train.__main__ import main, run
from tests.train import PYTHON, REPO, small_args, subprocess_env

TSV = "sentence\tlabel\ngood film\t1\nbad film\t0\nfine film\t1\n"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Data files, tiny models and a finished no_kd run with checkpoints, shared by the cases."""
    root = tmp_path_factory.mktemp("assets")
    teacher, student = build_tiny_models(str(root / "models"), task="sequence_classification",
                                         label_names=LABEL_NAMES, vocab=synthetic_vocab(), seed=0)
    files = {"teacher": teacher, "student": student, "root": root}

    def write(name, text, mode="w"):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.write_bytes if mode == "wb" else path.write_text)(text)
        files[name] = str(path)

    write("train.tsv", TSV)
    write("dev_unknown_label.tsv", "sentence\tlabel\ngood film\t7\n")
    write("ragged.tsv", "sentence\tlabel\ngood film\t1\nbad\tfilm\t0\n")
    write("no_label.tsv", "sentence\nhello\n")
    write("empty.tsv", "")
    write("header_only.tsv", "sentence\tlabel\n")
    write("latin1.tsv", "sentence\tlabel\ncaf\xe9 film\t1\n".encode("latin-1"), mode="wb")
    write("empty_text.tsv", "sentence\tlabel\ngood film\t1\n \t0\n")
    write("empty_label.tsv", "sentence\tlabel\ngood film\t1\nbad film\t \n")
    write("train.txt", TSV)
    write("bad.jsonl", '{"sentence": "a", "label": 1}\n{"sentence": "b", "label": \n')
    write("list_label.jsonl", '{"sentence": "a", "label": [1]}\n')
    write("not_iob2.conll", "EU B-ORG\nrejects X-MISC\n")
    write("causal.jsonl", '{"prompt": "say hi"}\n')
    write("bad.yaml", "learning_rate: [1\n")
    write("list.yaml", "- learning_rate\n")
    write("unknown_key.yaml", "learning_rat: 0.1\n")
    os.makedirs(root / "empty_model_dir")
    files["empty_model_dir"] = str(root / "empty_model_dir")
    small_vocab = root / "small_vocab_teacher"
    shutil.copytree(teacher, small_vocab)
    config = json.loads((small_vocab / "config.json").read_text())
    (small_vocab / "config.json").write_text(json.dumps({**config, "vocab_size": 8}))
    files["small_vocab_teacher"] = str(small_vocab)
    relabelled = root / "relabelled_teacher"
    shutil.copytree(teacher, relabelled)
    (relabelled / "config.json").write_text(json.dumps({**config, "id2label": {"0": "bad", "1": "good"},
                                                        "label2id": {"bad": 0, "good": 1}}))
    files["relabelled_teacher"] = str(relabelled)
    finished = root / "finished"
    assert main(small_args(finished, method="no_kd", save_strategy="steps", save_steps=2)) == 0
    files["finished"] = str(finished)
    return files


def _run_copy(assets, out, damage=None):
    """output_dir = a copy of the finished no_kd run, made unfinished (train_results.json removed), with
    ``damage(latest checkpoint)`` applied; returns the latest checkpoint's path."""
    shutil.copytree(assets["finished"], out)
    os.remove(out / "train_results.json")
    latest = checkpoint.latest_checkpoint(str(out))
    if damage:
        damage(latest)
    return latest


def _truncate(name):
    def damage(directory):
        path = os.path.join(directory, name)
        with open(path, "rb") as fh:
            data = fh.read()
        with open(path, "wb") as fh:
            fh.write(data[: len(data) // 3])
    return damage


def _other_stage(directory):
    path = os.path.join(directory, checkpoint.STATE_FILE)
    with open(path) as fh:
        state = json.load(fh)
    with open(path, "w") as fh:
        json.dump({**state, "stage": "experts"}, fh)


def _pickled_layout(directory):
    for name in os.listdir(directory):
        if name.endswith(".state.safetensors"):
            os.remove(os.path.join(directory, name))
    torch.save({"state": {}}, os.path.join(directory, "optimizer.pt"))


def _data(assets, train, validation=None, **extra):
    flags = dict(method="no_kd", train_file=assets[train], teacher_model_name_or_path=assets["teacher"],
                 model_name_or_path=assets["student"])
    if validation:
        flags["validation_file"] = assets[validation]
    return {**flags, **extra}


# id -> (assets, out) -> (flags for small_args (or a list of raw arguments), expected message regex)
CASES = {
    # ---- options and config files
    "unknown option": lambda a, o: (["--learning_rat", "0.1"], r"unknown option --learning_rat; did you mean 'learning_rate'"),
    "option of the wrong type": lambda a, o: (dict(learning_rate="fast"), r"learning_rate expects float, got 'fast'"),
    "bool that is not one": lambda a, o: (dict(fp16="maybe"), r"fp16 expects bool, got 'maybe'"),
    "learning rate <= 0": lambda a, o: (dict(learning_rate=-1), r"learning_rate must be > 0, got -1"),
    "learning rate not finite": lambda a, o: (dict(learning_rate="nan"), r"learning_rate must be finite .*, got nan"),
    "expert learning rate that overflows float32": lambda a, o: (dict(expert_learning_rate="1e39"),
                                                                 r"expert_learning_rate must be finite in float32 "
                                                                 r"\(\|value\| <= 3.403e\+38.*, got 1e\+39"),
    "batch size 0": lambda a, o: (dict(per_device_train_batch_size=0), r"per_device_train_batch_size must be >= 1"),
    "warmup ratio >= 1": lambda a, o: (dict(warmup_ratio=1.5), r"warmup_ratio must be in \[0, 1\), got 1.5"),
    "bf16 and fp16": lambda a, o: (dict(bf16=True, fp16=True), r"bf16 and fp16 are exclusive"),
    "unknown choice": lambda a, o: (dict(eval_strategy="sometimes"), r"eval_strategy must be one of no, steps, epoch"),
    "unknown stage": lambda a, o: (dict(stages="teacher,distil"), r"unknown stage 'distil'"),
    "unknown tracker": lambda a, o: (dict(report_to="wandb"), r"unknown report_to entry 'wandb'"),
    "metric the task does not compute": lambda a, o: (dict(metric_for_best_model="f1"),
                                                      r"metric_for_best_model='f1' is not computed"),
    "empty output_dir": lambda a, o: (dict(output_dir=" "), r"output_dir must not be empty"),
    "max_seq_length too small": lambda a, o: (dict(max_seq_length=1), r"max_seq_length must be an integer >= 2"),
    "max_train_samples 0": lambda a, o: (dict(max_train_samples=0), r"max_train_samples must be >= 1 or None"),
    "unexpected argument": lambda a, o: (["stray"], r"unexpected argument 'stray'"),
    "missing config file": lambda a, o: (["--config", str(o.parent / "none.yaml")], r"none.yaml' does not exist"),
    "config that is not YAML": lambda a, o: (["--config", a["bad.yaml"]], r"bad.yaml' is not valid YAML"),
    "config that is not a mapping": lambda a, o: (["--config", a["list.yaml"]], r"must be a mapping of option: value"),
    "unknown key in a config": lambda a, o: (["--config", a["unknown_key.yaml"]],
                                             r"unknown option 'learning_rat' in .*unknown_key.yaml; did you mean"),
    # ---- methods and their options
    "unknown method": lambda a, o: (dict(method="pee"), r"unknown method 'pee' \(did you mean 'pee_kd'\?\)"),
    "method module that does not import": lambda a, o: (dict(method="no_such_pkg.mod:Thing"),
                                                        r"module 'no_such_pkg.mod' does not import"),
    "method class that is not a Method": lambda a, o: (dict(method="kdengine.methods.baselines:KDLossOptions"),
                                                       r"is not a kdengine.methods.base.Method subclass"),
    "option of another method": lambda a, o: (dict(method="vanilla_kd", num_experts=2),
                                              r"--num_experts .* belongs to method pee_kd"),
    "negative kd_weight": lambda a, o: (dict(method="vanilla_kd", kd_weight=-0.5), r"kd_weight must be >= 0, got -0.5"),
    "temperature 0": lambda a, o: (dict(method="vanilla_kd", kd_temperature=0), r"kd_temperature must be > 0"),
    "teacher_top_k above num_experts": lambda a, o: (dict(num_experts=2, teacher_top_k=3),
                                                     r"teacher_top_k=3 must be in \[1, num_experts=2\]"),
    "task the method does not support": lambda a, o: (dict(task="causal_lm", train_file=a["causal.jsonl"]),
                                                      r"method pee_kd does not support task causal_lm"),
    # ---- output_dir
    "output_dir that is a file": lambda a, o: (dict(output_dir=a["train.tsv"]), r"output_dir .*train.tsv' is a file"),
    "output_dir under a file": lambda a, o: (dict(output_dir=os.path.join(a["train.tsv"], "run")),
                                             r"output_dir .* is under the file .*train.tsv'"),
    "output_dir of a different run": lambda a, o: (
        shutil.copytree(a["finished"], o) and dict(method="no_kd", learning_rate=0.5),
        r"holds a run with a different config \(learning_rate: 0.002 -> 0.5\)"),
    "unfinished run without resume": lambda a, o: (_run_copy(a, o) and dict(method="no_kd", save_strategy="steps", save_steps=2),
                                                   r"holds checkpoints of an unfinished run; pass --resume_from_checkpoint last"),
    # ---- resume
    "resume path that does not exist": lambda a, o: (dict(resume_from_checkpoint=str(o.parent / "nope")),
                                                     r"resume_from_checkpoint=.*nope' does not exist"),
    "resume path that is no checkpoint": lambda a, o: (dict(resume_from_checkpoint=a["empty_model_dir"]),
                                                       r"is not a complete checkpoint \(no trainer_state.json\)"),
    "resume from a truncated model": lambda a, o: (
        _run_copy(a, o, _truncate("model.safetensors")) and dict(method="no_kd", save_strategy="steps", save_steps=2,
                                                                 resume_from_checkpoint="last"),
        r"model.safetensors is not a readable safetensors file"),
    "resume from a garbage optimizer state": lambda a, o: (
        _run_copy(a, o, _truncate("optimizer.state.safetensors"))
        and dict(method="no_kd", save_strategy="steps", save_steps=2, resume_from_checkpoint="last"),
        r"optimizer.state.safetensors is not a readable safetensors file"),
    "resume from a truncated trainer_state.json": lambda a, o: (
        _run_copy(a, o, _truncate("trainer_state.json"))
        and dict(method="no_kd", save_strategy="steps", save_steps=2, resume_from_checkpoint="last"),
        r"trainer_state.json is not readable JSON"),
    "resume from another stage's checkpoint": lambda a, o: (
        _run_copy(a, o, _other_stage) and dict(method="no_kd", save_strategy="steps", save_steps=2,
                                               resume_from_checkpoint=checkpoint.latest_checkpoint(str(o))),
        r"is a checkpoint of the stage 'experts', not of 'student'"),
    "resume from a pickled checkpoint": lambda a, o: (
        _run_copy(a, o, _pickled_layout) and dict(method="no_kd", save_strategy="steps", save_steps=2,
                                                  resume_from_checkpoint="last"),
        r"checkpoint of the old pickled layout \(optimizer.pt\), which kdengine no longer loads"),
    # ---- data
    "missing data file": lambda a, o: (_data(a, "train.tsv", train_file=str(o.parent / "missing.tsv")),
                                       r"data file not found: .*missing.tsv'"),
    "data file that is a directory": lambda a, o: (_data(a, "train.tsv", train_file=a["empty_model_dir"]),
                                                   r"data file .*empty_model_dir' is a directory; expected a file"),
    "unsupported extension": lambda a, o: (_data(a, "train.txt"), r"train.txt: unsupported file extension '.txt'"),
    "non-UTF-8 file": lambda a, o: (_data(a, "latin1.tsv"), r"latin1.tsv:2: not UTF-8 text \(byte 0xe9"),
    "row with the wrong column count": lambda a, o: (_data(a, "ragged.tsv"), r"ragged.tsv:3: expected 2 tab-separated"),
    "missing label column": lambda a, o: (_data(a, "no_label.tsv"), r"label_column='label' not found"),
    "missing text column": lambda a, o: (_data(a, "train.tsv", text_column="review"),
                                         r"text_column='review' not found; available columns"),
    "empty file": lambda a, o: (_data(a, "empty.tsv"), r"empty.tsv: empty file; expected a header row"),
    "header without rows": lambda a, o: (_data(a, "header_only.tsv"), r"header_only.tsv: no examples"),
    "invalid JSON line": lambda a, o: (_data(a, "bad.jsonl"), r"bad.jsonl:2: invalid JSON"),
    "label that is a list": lambda a, o: (_data(a, "list_label.jsonl"),
                                          r"list_label.jsonl:1: a label must be a string or an integer"),
    "empty label": lambda a, o: (_data(a, "empty_label.tsv"), r"empty_label.tsv:3: empty label"),
    "empty text": lambda a, o: (_data(a, "empty_text.tsv"), r"empty_text.tsv:3: column 'sentence' is empty"),
    "validation label unknown to training": lambda a, o: (_data(a, "train.tsv", "dev_unknown_label.tsv"),
                                                          r"label '7' does not occur in the training split"),
    "validation file without train file": lambda a, o: (dict(validation_file=a["train.tsv"]),
                                                         r"validation_file given without train_file"),
    "train file and dataset name": lambda a, o: (_data(a, "train.tsv", dataset_name="glue"),
                                                 r"give either train_file .* or dataset_name .*, not both"),
    "no validation split": lambda a, o: (_data(a, "train.tsv"), r"the task has no validation split"),
    "tag that is not IOB2": lambda a, o: (dict(method="no_kd", task="token_classification", train_file=a["not_iob2.conll"]),
                                          r"not_iob2.conll:2: tag 'X-MISC' is not IOB2"),
    "instruction data without responses": lambda a, o: (dict(method="no_kd", task="causal_lm", train_file=a["causal.jsonl"]),
                                                        r"causal.jsonl:1: column 'response' not found"),
    "synthetic task for token classification": lambda a, o: (dict(method="no_kd", task="token_classification"),
                                                             r"the synthetic task is sequence classification only"),
    # ---- models
    "tiny models with real data": lambda a, o: (dict(method="no_kd", train_file=a["train.tsv"], validation_file=a["train.tsv"]),
                                                r"tiny models are built only for the synthetic task"),
    "teacher without a student": lambda a, o: (dict(teacher_model_name_or_path=a["teacher"]),
                                               r"no student: pass --model_name_or_path or --student_num_layers"),
    "student twice": lambda a, o: (dict(teacher_model_name_or_path=a["teacher"], model_name_or_path=a["student"],
                                        student_num_layers=1), r"pass either --model_name_or_path or --student_num_layers"),
    "teacher path that is a file": lambda a, o: (_data(a, "train.tsv", "train.tsv", teacher_model_name_or_path=a["train.tsv"]),
                                                 r"teacher_model_name_or_path .*train.tsv' is a file"),
    "empty model directory": lambda a, o: (_data(a, "train.tsv", "train.tsv", model_name_or_path=a["empty_model_dir"]),
                                           r"model_name_or_path .*empty_model_dir' is a directory without config.json"),
    "max_seq_length above the model's positions": lambda a, o: (dict(max_seq_length=1000),
                                                                r"max_seq_length=1000 exceeds the 512 positions"),
    "input prompts beyond the teacher's positions": lambda a, o: (
        dict(prompt_kind="prompt", max_seq_length=510, num_virtual_tokens=8),
        r"num_virtual_tokens=8 prompt tokens beside max_seq_length=510 text tokens: 518 positions, but the teacher "
        r".* has 512; lower max_seq_length to 504"),
    "student_num_layers above the teacher's": lambda a, o: (dict(student_num_layers=9),
                                                            r"student_num_layers must be in \[1, 4\]"),
    "tokenizer larger than the embeddings": lambda a, o: (
        _data(a, "train.tsv", "train.tsv", teacher_model_name_or_path=a["small_vocab_teacher"], method="vanilla_kd"),
        r"the tokenizer has \d+ tokens but teacher_model_name_or_path .* embeds only 8 ids"),
    "teachers with different label sets": lambda a, o: (
        _data(a, "train.tsv", "train.tsv", method="vanilla_kd",
              teacher_model_name_or_path=f"{a['teacher']},{a['relabelled_teacher']}"),
        r"the teachers have different label sets"),
    # ---- stages
    "evaluate before the student ran": lambda a, o: (dict(method="no_kd", stages="evaluate"),
                                                     r"the student stage has not run"),
    "student before the teacher ran": lambda a, o: (dict(stages="student"), r"the teacher stage has not run"),
}

DEVICE_CASES = {
    "kernel backend that cannot run here": (dict(kernel_backend="cuda"), r"kernel_backend='cuda' cannot run here",
                                            availability("cuda")[0]),
    "fp16 without a CUDA device": (dict(fp16=True), r"fp16 needs a CUDA device", torch.cuda.is_available()),
}


def _argv(flags, out):
    if isinstance(flags, list):
        return flags
    return small_args(flags.get("output_dir", out), **{k: v for k, v in flags.items() if k != "output_dir"})


def _snapshot(path):
    """Everything under ``path`` (None when it does not exist): {relative path: bytes or 'dir'}."""
    if not os.path.lexists(path):
        return None
    if not os.path.isdir(path):
        return open(path, "rb").read()
    found = {}
    for root, dirs, files in os.walk(path):
        for name in dirs:
            found[os.path.relpath(os.path.join(root, name), path)] = "dir"
        for name in files:
            with open(os.path.join(root, name), "rb") as fh:
                found[os.path.relpath(os.path.join(root, name), path)] = fh.read()
    return found


def _prepare(case, assets, tmp_path):
    out = tmp_path / "out"
    flags, expected = case(assets, out)
    argv = _argv(flags, out)
    if not out.exists():
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    target = argv[argv.index("--output_dir") + 1] if "--output_dir" in argv else str(out)
    return argv, expected, target


def _check_cli(argv, expected, target, capsys):
    before = _snapshot(target)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]          # progress bars share stderr
    assert last.startswith("kdengine.train: error: "), err[-2000:]
    assert re.search(expected, last), last
    assert "Traceback" not in err
    assert _snapshot(target) == before, "output_dir changed"


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_on_the_command_line(name, assets, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv, expected, target = _prepare(CASES[name], assets, tmp_path)
    _check_cli(argv, expected, target, capsys)


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_through_the_api(name, assets, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv, expected, target = _prepare(CASES[name], assets, tmp_path)
    before = _snapshot(target)
    with pytest.raises(ValueError, match=expected) as info:
        run(parse_args(argv))
    assert "\n" not in str(info.value)
    assert _snapshot(target) == before, "output_dir changed"


@pytest.mark.parametrize("name", list(DEVICE_CASES))
def test_what_this_device_cannot_run(name, tmp_path, capsys):
    flags, expected, runs_here = DEVICE_CASES[name]
    if runs_here:
        pytest.skip("it runs on this machine")
    out = tmp_path / "out"
    _check_cli(small_args(out, **flags), expected, str(out), capsys)
    assert not out.exists()


@pytest.mark.parametrize("name", ["non-UTF-8 file", "max_seq_length above the model's positions",
                                  "student before the teacher ran"])
def test_a_refused_run_creates_no_output_dir(name, assets, tmp_path, capsys):
    out = tmp_path / "new" / "out"
    flags, expected = CASES[name](assets, out)
    _check_cli(_argv(flags, out), expected, str(out), capsys)
    assert not (tmp_path / "new").exists()


def test_an_output_dir_that_cannot_be_written():
    """Run by a user who cannot write the parent (root writes anything: the child runs as nobody)."""
    as_nobody = os.geteuid() == 0
    if as_nobody and shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv to drop to another user")
    locked = tempfile.mkdtemp(prefix="kdengine-locked-")
    os.chmod(locked, 0o755 if as_nobody else 0o555)
    prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if as_nobody else []
    if as_nobody:
        probe = subprocess.run([*prefix, PYTHON, "-c", "import kdengine.train"], cwd=REPO, env=subprocess_env(),
                               capture_output=True, text=True, timeout=300)
        if probe.returncode != 0:
            os.rmdir(locked)
            pytest.skip(f"user nobody cannot import kdengine from this checkout (a parent folder not readable "
                        f"by others, e.g. a mktemp -d clone): {probe.stderr.strip().splitlines()[-1][:200]}")
    try:
        out = os.path.join(locked, "out")
        result = subprocess.run([*prefix, PYTHON, "-m", "kdengine.train", *small_args(out)], cwd=REPO,
                                env={**subprocess_env(), "HOME": tempfile.gettempdir()}, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 2, result.stderr[-2000:]
        last = result.stderr.strip().splitlines()[-1]
        assert re.fullmatch(rf"kdengine.train: error: output_dir '{re.escape(out)}' cannot be written: "
                            rf"'{re.escape(locked)}' is not writable by this user; pass another --output_dir", last)
        assert "Traceback" not in result.stderr and os.listdir(locked) == []
    finally:
        os.chmod(locked, 0o755)
        shutil.rmtree(locked)


def test_labels_compare_by_value_whatever_their_spelling(tmp_path):
    from kdengine.data import load_task_data  # noqa: PLC0415

    (tmp_path / "train.tsv").write_text("sentence\tlabel\na\t0\nb\t0.0\nc\t1\nd\t1.0\ne\t01\n")
    (tmp_path / "dev.jsonl").write_text('{"sentence": "f", "label": 1.0}\n{"sentence": "g", "label": 0}\n')
    data = load_task_data({"train_file": str(tmp_path / "train.tsv"), "validation_file": str(tmp_path / "dev.jsonl")})
    assert data.label_names == ["0", "1"]
    assert [ex["label"] for ex in data.train] == [0, 0, 1, 1, 1]
    assert [ex["label"] for ex in data.validation] == [1, 0]


def test_the_command_line_process_exits_2_without_a_traceback(assets, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([PYTHON, "-m", "kdengine.train", *small_args(out, **_data(assets, "latin1.tsv"))],
                            cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("kdengine.train: error: ")
    assert "latin1.tsv:2: not UTF-8 text" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()
