"""Several teachers: teacher_model_name_or_path as a comma list or a YAML list, every teacher in
ctx.teachers and in the reports, label sets checked to agree before any work."""

import json
import shutil

import torch

from kdengine.config import parse_args
from kdengine.data.synthetic import LABEL_NAMES, synthetic_vocab
from kdengine.methods.baselines import VanillaKD
from kdengine.models import model_inputs
from kdengine.tiny_models import build_tiny_models
from kdengine.train.__main__ import main
from tests.train import read_json, small_args


class MeanOfTeachers(VanillaKD):
    """Vanilla KD from the mean of all teachers' logits."""

    name = "mean_of_teachers"

    def teacher_outputs(self, batch):
        assert len(self.ctx.teachers) == 2
        logits = [teacher(**model_inputs(batch)).logits for teacher in self.ctx.teachers]     # 2 x [B, C]
        return {"logits": torch.stack(logits).mean(0)}


def _models(tmp_path, second_labels=None):
    teacher, student = build_tiny_models(str(tmp_path / "models"), task="sequence_classification",
                                         label_names=LABEL_NAMES, vocab=synthetic_vocab(), seed=0)
    other = tmp_path / "other_teacher"
    shutil.copytree(teacher, other)
    if second_labels:
        config = json.loads((other / "config.json").read_text())
        config.update(id2label=dict(enumerate(second_labels)), label2id={n: i for i, n in enumerate(second_labels)})
        (other / "config.json").write_text(json.dumps(config))
    return teacher, str(other), student


def test_two_teachers_reach_the_method_and_the_reports(tmp_path, capsys):
    teacher, other, student = _models(tmp_path)
    out = tmp_path / "run"
    flags = small_args(out, method="tests.train.test_teachers:MeanOfTeachers", model_name_or_path=student,
                       teacher_model_name_or_path=f"{teacher},{other}")
    assert main(flags) == 0
    assert set(read_json(out / "teacher_results.json")) == {"teacher", "teacher_1"}
    rows = [r["model"] for r in read_json(out / "comparison.json")["rows"]]
    assert rows == ["teacher", "teacher_1", "tests.train.test_teachers:MeanOfTeachers"]


def test_a_yaml_list_of_teachers(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("teacher_model_name_or_path:\n  - /models/a\n  - /models/b\n")
    cfg = parse_args(["--config", str(path), "--student_num_layers", "1"])
    assert cfg.teacher_list() == ["/models/a", "/models/b"]
    assert parse_args(["--teacher_model_name_or_path", "a, b", "--student_num_layers", "1"]).teacher_list() == ["a", "b"]


def test_teachers_with_different_label_sets_stop_before_any_work(tmp_path, capsys):
    teacher, other, student = _models(tmp_path, second_labels=["bad", "good"])
    out = tmp_path / "run"
    flags = small_args(out, method="vanilla_kd", model_name_or_path=student,
                       teacher_model_name_or_path=f"{teacher},{other}")
    assert main(flags) == 2
    err = capsys.readouterr().err
    assert "the teachers have different label sets" in err and "['negative', 'positive']" in err
    assert "['bad', 'good']" in err
    assert not (out / "teacher").exists() and not (out / "model.safetensors").exists()
