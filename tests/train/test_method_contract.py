"""The Method contract on the shared loop: teacher-side gradients, several optimizers updated in the
method's order, step counters, extra modules in checkpoints, and stage definitions checked early."""

import os

import pytest
import torch
import torch.nn.functional as F

from kdengine.config import parse_args
from kdengine.methods.base import STUDENT, Method, OptimizerSpec, Stage
from kdengine.models import model_inputs
from kdengine.train.stages import check_stage_names
from kdengine.train.state_file import SUFFIX
from kdengine.train.teacher import context
from kdengine.train.trainer import Trainer, make_accelerator
from tests.train import small_args, tiny_task


class TeacherPrompt(torch.nn.Module):
    """A trainable offset on the frozen teacher's logits (stands for PromptKD's teacher prompt)."""

    def __init__(self, num_labels: int):
        super().__init__()
        self.offset = torch.nn.Parameter(torch.zeros(num_labels))


class PromptKDLike(Method):
    """Per micro-batch: update the teacher prompt on its own loss first, then distil the student
    from the updated teacher, as PromptKD orders its two updates."""

    name = "promptkd_like"

    def __init__(self, ctx):
        super().__init__(ctx)
        self.seen = []

    def build_stage(self, name, student):
        return Stage(STUDENT, {STUDENT: student, "prompt": TeacherPrompt(self.ctx.num_labels)}, 1e-3, 1,
                     optimizers=[OptimizerSpec("student", (STUDENT,)),
                                 OptimizerSpec("prompt", ("prompt",), learning_rate=0.1, schedule="constant")])

    def training_step(self, step, batch):
        prompt = step.modules["prompt"]
        with torch.no_grad():
            base = self.ctx.teacher(**model_inputs(batch)).logits
        before = prompt.offset.detach().clone()
        teacher_loss = F.cross_entropy(base + prompt.offset, batch["labels"])     # gradient into the teacher side
        step.update(teacher_loss, "prompt")
        moved = not torch.equal(before, prompt.offset.detach())
        self.seen.append((step.global_step, step.total_steps, moved))
        student = step.model(**model_inputs(batch)).logits
        target = (base + prompt.offset).detach().softmax(-1)                       # the updated teacher
        loss = F.kl_div(student.log_softmax(-1), target, reduction="batchmean")
        return loss, {"teacher_loss": teacher_loss.detach()}


def test_teacher_side_optimizer_first_then_the_student(tmp_path):
    out = tmp_path / "out"
    cfg = parse_args(small_args(out, method="no_kd", per_device_train_batch_size=8, save_strategy="steps",
                                save_steps=3, save_total_limit=None, eval_strategy="no"))
    teacher, student, inputs = tiny_task(tmp_path / "tiny", cfg)
    os.makedirs(out)
    accelerator = make_accelerator(cfg, str(out))
    method = PromptKDLike(context(cfg, accelerator, inputs, str(out), teachers=[teacher]))
    stage = method.build_stage(STUDENT, student)
    start = {k: v.clone() for k, v in student.state_dict().items()}
    trainer = Trainer(cfg, accelerator, method, stage, str(out))
    trainer.train()
    assert [s[:2] for s in method.seen] == [(i, 6) for i in range(6)]              # 48 examples / 8, 1 epoch
    assert all(moved for _, _, moved in method.seen)                                # updated before the student
    assert set(trainer.schedulers["prompt"].get_last_lr()) == {0.1}                 # constant after 0 warmup steps
    assert set(trainer.schedulers["student"].get_last_lr()) == {0.0}                # linear decay to 0
    assert any(not torch.equal(start[k], v) for k, v in student.state_dict().items())
    assert stage.modules["prompt"].offset.abs().sum() > 0
    for name in ("prompt.safetensors", f"optimizer_prompt{SUFFIX}", f"scheduler_prompt{SUFFIX}", "model.safetensors"):
        assert (out / "checkpoint-3" / name).is_file(), name
    with pytest.raises(ValueError, match="stage 'student' has no optimizer 'nope'"):
        trainer.step_context.update(torch.zeros((), requires_grad=True), "nope")


def test_a_stage_without_trainable_parameters_is_refused(tmp_path):
    cfg = parse_args(small_args(tmp_path / "out", method="no_kd"))
    _, student, inputs = tiny_task(tmp_path / "tiny", cfg, n_train=16)
    student.requires_grad_(False)
    accelerator = make_accelerator(cfg, str(tmp_path))
    method = PromptKDLike(context(cfg, accelerator, inputs, str(tmp_path)))
    with pytest.raises(ValueError, match="stage 'student' has no trainable parameter"):
        Trainer(cfg, accelerator, method, Stage(STUDENT, {STUDENT: student}, 1e-3, 1), str(tmp_path))


@pytest.mark.parametrize("names, message", [
    (("experts",), "must end with 'student'"),
    (("teacher", "student"), "stage name 'teacher' must be a unique identifier"),
    (("a b", "student"), "stage name 'a b'"),
    (("x", "x", "student"), "stage name 'x'"),
])
def test_bad_stage_lists_are_refused(names, message):
    with pytest.raises(ValueError, match=message):
        check_stage_names(names, "m")
    check_stage_names(("experts", "selector", "student"), "m")
