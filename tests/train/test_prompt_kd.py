"""PromptKD (method prompt_kd): its losses against float64 references, what its step trains and what
it leaves frozen, sampling and masking, the embedded run, resume, ROUGE-L and bad input."""

import copy
import re
import importlib.machinery
import importlib.util
import json
import math
import os
import sys
import types

import pytest
import torch
import yaml

from kdengine import generation, models
from kdengine.constants import IGNORE_INDEX
from kdengine.data import make_collate_fn, tokenize_split
from kdengine.data.synthetic import instruction_vocab, make_synthetic_instruction_task
from kdengine.methods.base import STUDENT
from kdengine.methods.prompt_kd import TEACHER_PROMPT, PromptKD, PromptKDOptions, base_weight_at, pooled_kl
from kdengine.options import TrainConfig
from kdengine.tiny_models import build_tiny_models
from kdengine.train.__main__ import TaskInputs, main
from kdengine.train.teacher import context
from kdengine.train.trainer import Trainer, make_accelerator
from tests.shared_data import SHARED_DATA
from tests.train import read_json, small_args

NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def _reference_kl(trained_logits, target_logits, divergence="reverse_kl", beta=0.5):
    """Mean over rows of D(trained ‖ target) in float64: reverse KL(q‖p), forward KL(p‖q), or TRL's
    generalized JSD (m = β p + (1 − β) q; β KL(p‖m) + (1 − β) KL(q‖m)), q = trained, p = target."""
    log_q = torch.log_softmax(trained_logits.double(), -1)
    log_p = torch.log_softmax(target_logits.double(), -1)
    if divergence == "reverse_kl":
        rows = (log_q.exp() * (log_q - log_p)).sum(-1)
    elif divergence == "forward_kl":
        rows = (log_p.exp() * (log_p - log_q)).sum(-1)
    else:
        log_m = torch.logsumexp(torch.stack([log_q + math.log(1 - beta), log_p + math.log(beta)]), 0)
        rows = beta * (log_p.exp() * (log_p - log_m)).sum(-1) + (1 - beta) * (log_q.exp() * (log_q - log_m)).sum(-1)
    return rows.mean()


@pytest.mark.parametrize("divergence,beta", [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.3)])
def test_pooled_kl_and_its_gradient_against_float64(divergence, beta):
    torch.manual_seed(0)
    trained, trained_w = torch.randn(13, 8, requires_grad=True), torch.randn(40, 8)
    target, target_w = torch.randn(13, 6), torch.randn(40, 6)
    loss = pooled_kl(trained, trained_w, target, target_w, divergence=divergence, jsd_beta=beta)
    loss.backward()
    reference_input = trained.detach().double().requires_grad_()
    reference = _reference_kl(reference_input @ trained_w.double().T, target.double() @ target_w.double().T,
                              divergence, beta)
    reference.backward()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    torch.testing.assert_close(trained.grad.double(), reference_input.grad, rtol=1e-4, atol=1e-6)


def test_the_regulariser_weight_fades_linearly_to_zero():
    assert [base_weight_at(2.0, s, 4) for s in range(5)] == [2.0, 1.5, 1.0, 0.5, 0.0]


# ---------------------------------------------------------------- the step on tiny GPT-2s
def _run(tmp_path, **options):
    """(method, trainer, batch) of the student stage on tiny GPT-2s (no dropout) and a fixed batch."""
    teacher_dir, student_dir = build_tiny_models(str(tmp_path / "tiny"), task="causal_lm", label_names=[],
                                                 vocab=instruction_vocab(), teacher=NO_DROPOUT, student=NO_DROPOUT)
    tokenizer = models.load_tokenizer(student_dir, "student")
    data = make_synthetic_instruction_task(0, 16, 4, 0)
    inputs = TaskInputs([], tokenizer, tokenize_split(data.train, tokenizer, "causal_lm", 32),
                        tokenize_split(data.validation, tokenizer, "causal_lm", 32),
                        make_collate_fn(tokenizer, "causal_lm"))
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), task="causal_lm", method="prompt_kd", report_to="none",
                      max_seq_length=32, per_device_train_batch_size=8, learning_rate=5e-3, warmup_ratio=0.0,
                      max_steps=10, options=PromptKDOptions(**{"max_new_tokens": 4, **options}))
    accelerator = make_accelerator(cfg, cfg.output_dir)
    teacher = models.freeze(models.load_for_task(teacher_dir, "causal_lm", [], what="teacher")[0])
    student = models.load_for_task(student_dir, "causal_lm", [], what="student")[0]
    method = PromptKD(context(cfg, accelerator, inputs, cfg.output_dir, teachers=[teacher]))
    trainer = Trainer(cfg, accelerator, method, method.build_stage(STUDENT, student), cfg.output_dir,
                      save_checkpoints=False)
    return method, trainer, inputs.collate_fn(list(inputs.train_dataset)[:8])


def _fixed_responses(monkeypatch, batch):
    """Make the student "sample" the reference responses of ``batch`` (the same batch every step)."""
    def reference(model, prompt_ids, prompt_mask, **_):
        lengths, full = prompt_mask.sum(1), batch["input_ids"].shape[1]
        cols = torch.arange(full - int(lengths.min())).unsqueeze(0) + lengths.unsqueeze(1)
        inside = cols < full
        cols = cols.clamp_max(full - 1)
        return batch["input_ids"].gather(1, cols), batch["attention_mask"].gather(1, cols).bool() & inside

    monkeypatch.setattr(generation, "sample_responses", reference)


def _logits(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_one_step_against_float64_references(tmp_path, monkeypatch):
    method, trainer, batch = _run(tmp_path, base_weight=2.0)
    _fixed_responses(monkeypatch, batch)
    teacher, student, prompted = method.ctx.teacher, trainer.model, trainer.modules[TEACHER_PROMPT]
    rows = batch["labels"] != IGNORE_INDEX
    experts = torch.zeros(len(batch["input_ids"]), dtype=torch.long)
    trainer.state["global_step"], total = 3, trainer.total_steps
    with torch.no_grad():
        q_student = _logits(student, batch)[rows]
        p_plain = _logits(teacher, batch)[rows]
        p_prompted = prompted(batch["input_ids"], batch["attention_mask"], experts).logits[rows]
    before = copy.deepcopy(student)
    loss, logs = trainer.training_step(batch)
    weight = 2.0 * (1 - 3 / total)
    assert logs["base_weight"].item() == pytest.approx(weight)
    assert logs["prompt_kl"].item() == pytest.approx(_reference_kl(p_prompted, q_student).item(), rel=1e-4)
    assert logs["base_kl"].item() == pytest.approx(_reference_kl(p_prompted, p_plain).item(), rel=1e-4, abs=1e-7)
    assert logs["teacher_loss"].item() == pytest.approx(logs["prompt_kl"].item() + weight * logs["base_kl"].item(),
                                                        rel=1e-5)
    with torch.no_grad():                                  # the student's target is the *updated* prompted teacher
        updated = prompted(batch["input_ids"], batch["attention_mask"], experts).logits[rows]
        assert not torch.equal(updated, p_prompted)
        assert loss.item() == pytest.approx(_reference_kl(_logits(before, batch)[rows], updated).item(), rel=1e-4)


def test_the_prompt_alone_learns_and_the_losses_fall(tmp_path, monkeypatch):
    method, trainer, batch = _run(tmp_path)
    _fixed_responses(monkeypatch, batch)
    teacher, student, prompted = method.ctx.teacher, trainer.model, trainer.modules[TEACHER_PROMPT]
    frozen = {k: v.clone() for k, v in teacher.state_dict().items()}
    assert [n for n, p in prompted.named_parameters() if p.requires_grad] == ["prompts"]
    update, seen = trainer.step_context.update, []

    def checked_update(loss, *names):
        prompt = prompted.prompts.detach().clone()
        update(loss, *names)
        if names == (TEACHER_PROMPT,):     # the teacher loss reached the prompt and nothing of the student
            seen.append(not torch.equal(prompt, prompted.prompts)
                        and all(p.grad is None for p in student.parameters()))

    trainer.step_context.update = checked_update
    history = [trainer.training_step(batch) for _ in range(8)]
    assert seen == [True] * 8
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in frozen.items())      # backbone unchanged
    first, last = history[0], history[-1]
    assert last[0] < 0.7 * first[0]                                                      # student KL
    assert last[1]["prompt_kl"] < first[1]["prompt_kl"]


# ---------------------------------------------------------------- sampling and masking
class _Scripted:
    """A "model" whose generate appends fixed tokens (the filler after eos is arbitrary, as generate's)."""

    def __init__(self, tokens):
        self.tokens = torch.tensor(tokens)

    def generate(self, input_ids, **_):
        return torch.cat([input_ids, self.tokens], 1)


def test_responses_end_at_the_first_eos_and_nothing_after_it_counts():
    eos, pad = 3, 0
    prompts = torch.tensor([[0, 7, 8], [9, 10, 11]])
    response, keep = generation.sample_responses(_Scripted([[5, eos, eos, 6], [6, 6, 6, 6]]), prompts,
                                                 (prompts != 0).long(), max_new_tokens=4, temperature=1.0,
                                                 top_p=1.0, eos_token_id=eos, pad_token_id=pad)
    assert keep.tolist() == [[True, True, False, False], [True, True, True, True]]
    batch = generation.response_batch(prompts, (prompts != 0).long(), response, keep, pad)
    assert batch["input_ids"].tolist() == [[7, 8, 5, eos, 0, 0, 0], [9, 10, 11, 6, 6, 6, 6]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0, 0], [1] * 7]
    assert batch["labels"].tolist() == [[-100, 5, eos, -100, -100, -100, -100], [-100, -100, 6, 6, 6, 6, -100]]


def test_real_sampling_stops_at_eos(tmp_path):
    _, student_dir = build_tiny_models(str(tmp_path), task="causal_lm", label_names=[], vocab=instruction_vocab())
    model = models.load_for_task(student_dir, "causal_lm", [], what="student")[0].eval()
    eos_bias = torch.zeros(model.config.vocab_size)
    eos_bias[3] = 4.0                                        # [SEP], the eos, made likely by a bias on the head
    model.lm_head.bias = torch.nn.Parameter(eos_bias)
    torch.manual_seed(0)
    prompts = torch.randint(5, 60, (16, 5))
    response, keep = generation.sample_responses(model, prompts, torch.ones_like(prompts), max_new_tokens=12,
                                                 temperature=1.0, top_p=1.0, eos_token_id=3, pad_token_id=0)
    ended = (response == 3).any(1)
    assert bool(ended.any()) and response.shape[1] > 1
    for row, mask in zip(response, keep):
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()
        if 3 in row.tolist():
            assert row.tolist().index(3) == n - 1                 # kept up to and including the first eos


def test_sampled_batches_have_the_layout_of_tokenized_ones(tmp_path):
    _, student_dir = build_tiny_models(str(tmp_path), task="causal_lm", label_names=[], vocab=instruction_vocab())
    tokenizer = models.load_tokenizer(student_dir, "student")
    items = tokenize_split(make_synthetic_instruction_task(0, 8, 1, 0).train, tokenizer, "causal_lm", 32)
    batch = make_collate_fn(tokenizer, "causal_lm")(list(items))
    prompts, mask, lengths = generation.prompt_batch(batch["input_ids"], batch["labels"], tokenizer.pad_token_id)
    responses = [item["input_ids"][n:] for item, n in zip(items, lengths.tolist())]
    width = max(map(len, responses))
    response = torch.tensor([r + [0] * (width - len(r)) for r in responses])
    keep = torch.tensor([[True] * len(r) + [False] * (width - len(r)) for r in responses])
    rebuilt = generation.response_batch(prompts, mask, response, keep, tokenizer.pad_token_id)
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(rebuilt[key][:, :batch[key].shape[1]], batch[key])
        assert not rebuilt["attention_mask"][:, batch[key].shape[1]:].any()


# ---------------------------------------------------------------- the command
EMBEDDED = dict(method="prompt_kd", synthetic_num_train=64, synthetic_num_validation=16, max_new_tokens=3,
                sft_num_train_epochs=1, max_seq_length=24)


def test_the_embedded_run_trains_a_teacher_an_sft_student_and_the_prompt_kd_student(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(small_args(out, **EMBEDDED, compare_baselines=True)) == 0
    config = read_json(out / "comparison.json")
    assert [r["model"] for r in config["rows"]] == ["teacher", "no_kd", "vanilla_kd", "prompt_kd"]
    assert "eval_loss" in read_json(out / "eval_results.json")
    assert (out / "modules" / f"{TEACHER_PROMPT}.safetensors").is_file()
    assert (out / "sft" / "student.safetensors").is_file()
    rows = [json.loads(line) for line in open(out / "metrics.jsonl") if "teacher_loss" in line]
    assert rows and all({"prompt_kl", "base_kl", "base_weight", "response_tokens"} <= set(r) for r in rows)
    printed = capsys.readouterr().out
    if generation.rouge_available():
        assert 0.0 <= read_json(out / "eval_results.json")["eval_rougeL"] <= 100.0
        assert (out / "predictions" / "seed10.jsonl").is_file()
    else:
        assert "ROUGE-L skipped: the rouge-score package is not installed" in printed


def test_rouge_l_without_rouge_score_is_skipped_with_one_note(monkeypatch):
    """Without the package (an install with --no-deps, as on the GPU image) the evaluation samples
    nothing, returns {} and says so once per process."""
    monkeypatch.setitem(sys.modules, "rouge_score", None)          # find_spec -> None: not installed
    monkeypatch.setattr(generation, "_NOTED", set())
    notes = []
    for _ in range(2):
        assert generation.rouge_l(None, [], tokenizer=None, collate_fn=None, batch_size=1, max_seq_length=8,
                                  seeds=[10], device=torch.device("cpu"), output_dir=None, log=notes.append) == {}
    assert notes == ["[evaluate] ROUGE-L skipped: the rouge-score package is not installed (pip install rouge-score)"]


def test_sft_is_no_kd_under_its_name(tmp_path):
    out = tmp_path / "run"
    assert main(small_args(out, method="sft", task="causal_lm", synthetic_num_train=32, synthetic_num_validation=8,
                           compare_baselines=True, max_seq_length=24)) == 0
    assert [r["model"] for r in read_json(out / "comparison.json")["rows"]] == ["teacher", "vanilla_kd", "sft"]


def test_rouge_l_with_rouge_score(tmp_path, monkeypatch):
    """rouge-score stood in by a scorer that counts exact matches: the evaluation samples, scores and
    writes predictions/ once per seed."""
    module = types.ModuleType("rouge_score")
    module.__spec__ = importlib.machinery.ModuleSpec("rouge_score", None)
    scorer_module = types.ModuleType("rouge_score.rouge_scorer")

    class RougeScorer:
        def __init__(self, kinds, use_stemmer):
            assert kinds == ["rougeL"] and use_stemmer

        def score(self, reference, generated):
            return {"rougeL": types.SimpleNamespace(fmeasure=float(reference == generated))}

    scorer_module.RougeScorer = RougeScorer
    module.rouge_scorer = scorer_module
    monkeypatch.setitem(sys.modules, "rouge_score", module)
    monkeypatch.setitem(sys.modules, "rouge_score.rouge_scorer", scorer_module)
    out = tmp_path / "run"
    assert main(small_args(out, **EMBEDDED, eval_generation_seeds="10,20", num_train_epochs=0.5)) == 0
    results = read_json(out / "eval_results.json")
    assert 0.0 <= results["eval_rougeL"] <= 100.0 and "eval_rougeL_std" in results
    assert 0.0 <= read_json(out / "teacher_results.json")["teacher"]["eval_rougeL"] <= 100.0
    assert (out / "stages" / "teacher" / "predictions" / "seed10.jsonl").is_file()
    assert all("eval_rougeL" in row for row in read_json(out / "comparison.json")["rows"])     # the table
    for seed in (10, 20):
        rows = [json.loads(line) for line in open(out / "predictions" / f"seed{seed}.jsonl")]
        assert len(rows) == 16 and {"prompt", "reference", "generated"} == set(rows[0])
        assert rows[0]["reference"].split()[1] in ("positive", "negative")


GSM8K = os.path.join(SHARED_DATA, "gsm8k")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.data
@pytest.mark.skipif(not os.path.isdir(GSM8K), reason="needs ../shared/data/gsm8k")
def test_the_gsm8k_pipeline_at_a_tiny_size(tmp_path):
    """scripts/gsm8k_models.py (a BPE tokenizer trained on the data, GPT-2s from scratch, the teacher
    trained on the answers) then configs/prompt_kd_gsm8k.yaml, both with tiny sizes and data."""
    with open(os.path.join(REPO, "configs", "prompt_kd_gsm8k.yaml")) as fh:
        config = yaml.safe_load(fh)
    models_dir, run = tmp_path / "models", tmp_path / "run"
    config.update(train_file=f"{GSM8K}/train.jsonl", validation_file=f"{GSM8K}/test.jsonl", max_train_samples=16,
                  max_eval_samples=4, max_seq_length=256, eval_generation_seeds="10", num_train_epochs=1,
                  sft_num_train_epochs=1, max_new_tokens=4, per_device_train_batch_size=8, compare_baselines=False,
                  teacher_model_name_or_path=str(models_dir / "teacher"),
                  model_name_or_path=str(models_dir / "student_init"), output_dir=str(run))
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    spec = importlib.util.spec_from_file_location("gsm8k_models", os.path.join(REPO, "scripts", "gsm8k_models.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--config", str(path), "--vocab", "1000", "--teacher", "1x64", "--student", "1x64",
                        "--teacher-epochs", "1"]) == 0
    tokenizer = models.load_tokenizer(str(models_dir / "teacher"), "teacher")
    assert len(tokenizer) == 1000 and tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token == "<|pad|>"
    assert main(["--config", str(path)]) == 0
    assert (run / "modules" / f"{TEACHER_PROMPT}.safetensors").is_file()
    assert read_json(run / "teacher_results.json")["teacher"]["eval_samples"] == 4
    if generation.rouge_available():
        assert 0.0 <= read_json(run / "eval_results.json")["eval_rougeL"] <= 100.0


def test_resume_reproduces_the_uninterrupted_run(tmp_path, capsys):
    """A run stopped after its checkpoint at step 2 of the student stage (the files of later steps
    removed) continues with --resume_from_checkpoint last and ends with the same metrics."""
    flags = dict(EMBEDDED, per_device_train_batch_size=16, save_strategy="steps", save_steps=2,
                 save_total_limit="None", eval_strategy="no")
    full = tmp_path / "full"
    assert main(small_args(full, **flags)) == 0
    cut = tmp_path / "cut"
    assert main(small_args(cut, **flags)) == 0
    assert sorted(p.name for p in cut.glob("checkpoint-*")) == ["checkpoint-2"]   # 4 steps: the last is not saved
    for path in cut.glob("*_results.json"):
        path.unlink()
    capsys.readouterr()
    assert main(small_args(cut, **flags, resume_from_checkpoint="last")) == 0
    assert re.search(r"\[prompt_kd\] resumed from \S+checkpoint-2 at step 2", capsys.readouterr().out)
    assert read_json(cut / "eval_results.json") == read_json(full / "eval_results.json")


# ---------------------------------------------------------------- bad input
def _lm_dirs(tmp_path, student_vocab_extra=0, logit_scale=None):
    teacher_dir, student_dir = build_tiny_models(str(tmp_path / "tiny"), task="causal_lm", label_names=[],
                                                 vocab=instruction_vocab())
    model = models.load_for_task(student_dir, "causal_lm", [], what="student")[0]
    if student_vocab_extra:
        model.resize_token_embeddings(model.config.vocab_size + student_vocab_extra)
    model.config.logit_scale = logit_scale
    model.save_pretrained(student_dir)
    return teacher_dir, student_dir


def _files(tmp_path, rows):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("case,message", [
    ("vocab", r"prompt_kd needs one vocabulary: the teacher .* has vocab_size \d+ but the student has \d+"),
    ("max_new_tokens", r"max_new_tokens must be >= 1, got 0"),
    ("empty_response", r"'response' must be a non-empty string"),
    ("long_prompt", r"the prompt has \d+ tokens; causal_lm needs 1 to max_seq_length - 1 = 7 prompt tokens"),
    ("positions", r"prompt_length=7 prompt tokens beside max_seq_length=510 tokens need 517 positions"),
    ("logit_scale", r"the student's config transforms them \(logit_scale\)"),
])
def test_bad_input_is_refused_before_any_work(case, message, tmp_path, capsys):
    teacher, student = _lm_dirs(tmp_path, student_vocab_extra=3 if case == "vocab" else 0,
                                logit_scale=0.5 if case == "logit_scale" else None)
    good = {"prompt": "the film was great .", "response": "movies positive"}
    rows = {"empty_response": [good, {"prompt": "the pan is bad .", "response": " "}],
            "long_prompt": [good, {"prompt": "the pan is very very very bad and the lid is bad .",
                                   "response": "kitchen negative"}]}.get(case, [good])
    train = _files(tmp_path, rows)
    out = tmp_path / "run"
    flags = dict(method="prompt_kd", task="causal_lm", train_file=train, validation_file=train,
                 teacher_model_name_or_path=teacher, model_name_or_path=student,
                 max_seq_length={"long_prompt": 8, "positions": 510}.get(case, 24))
    if case == "max_new_tokens":
        flags["max_new_tokens"] = 0
    assert main(small_args(out, **flags)) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists()


def test_an_lm_head_with_a_bias_is_refused(tmp_path):
    method, trainer, _ = _run(tmp_path)
    student = copy.deepcopy(trainer.model)
    student.lm_head.bias = torch.nn.Parameter(torch.zeros(student.config.vocab_size))
    with pytest.raises(ValueError, match="the student's LM head has a bias"):
        method.build_stage(STUDENT, student)


def test_options_are_the_reference_defaults():
    options = PromptKDOptions()
    assert (options.prompt_length, options.prompt_init_text, options.temperature, options.top_p, options.base_weight,
            options.kd_divergence) == (7, "Suppose you are a student.", 1.0, 1.0, 1.0, "reverse_kl")


def test_prompt_length_zero_is_on_policy_kd_from_the_teacher_itself(tmp_path, monkeypatch):
    method, trainer, batch = _run(tmp_path, prompt_length=0, kd_divergence="jsd", jsd_beta=0.3)
    assert list(trainer.modules) == [STUDENT] and list(trainer.optimizers) == ["main"]
    _fixed_responses(monkeypatch, batch)
    rows = batch["labels"] != IGNORE_INDEX
    with torch.no_grad():
        reference = _reference_kl(_logits(trainer.model, batch)[rows], _logits(method.ctx.teacher, batch)[rows],
                                  "jsd", 0.3)
    loss, logs = trainer.training_step(batch)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-4) and set(logs) == {"response_tokens"}
