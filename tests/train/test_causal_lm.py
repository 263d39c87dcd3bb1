"""The causal_lm task: instruction/response data, prompt tokens out of the loss, next-token metrics,
and a generation-based evaluation hook (Method.extra_metrics)."""

import json

import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from kdengine.constants import IGNORE_INDEX
from kdengine.data import load_task_data, make_collate_fn, tokenize_split
from kdengine.data.synthetic import LABEL_NAMES, make_synthetic_task, synthetic_vocab
from kdengine.methods.baselines import VanillaKD
from kdengine.tiny_models import build_tiny_models
from kdengine.train.__main__ import main
from tests.train import read_json, small_args


class GreedyLength(VanillaKD):
    """Vanilla KD that also reports the mean length of greedy responses to the first prompts."""

    name = "greedy_length"

    def extra_metrics(self, model, dataset):
        model = self.ctx.accelerator.unwrap_model(model)
        lengths = []
        for item in list(dataset)[:4]:
            last_prompt_token = next(t for t, label in enumerate(item["labels"]) if label != IGNORE_INDEX)
            ids = torch.tensor([item["input_ids"][:last_prompt_token + 1]], device=self.ctx.device)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                                 pad_token_id=self.ctx.tokenizer.pad_token_id)
            lengths.append(out.shape[1] - ids.shape[1])
        return {"greedy_new_tokens": sum(lengths) / len(lengths)}


def _files(tmp_path):
    """Copy task: the response repeats the review (train 64, validation 16 examples)."""
    data = make_synthetic_task(0, 64, 16, 0)
    paths = []
    for name, split in (("train", data.train), ("validation", data.validation)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"prompt": ex["text"], "response": ex["text"]}) + "\n" for ex in split))
        paths.append(str(path))
    return paths


def _models(tmp_path):
    _, bert = build_tiny_models(str(tmp_path / "tiny"), task="sequence_classification", label_names=LABEL_NAMES,
                                vocab=synthetic_vocab(), seed=0)
    tokenizer = AutoTokenizer.from_pretrained(bert)
    dirs = []
    for name, layers, width in (("teacher", 2, 64), ("student", 1, 32)):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=width, n_layer=layers, n_head=2,
                                           n_positions=64))
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
        dirs.append(str(tmp_path / name))
    return dirs, tokenizer


def test_prompt_tokens_are_not_targets(tmp_path):
    train, _ = _files(tmp_path)
    (_, _), tokenizer = _models(tmp_path)
    data = load_task_data({"task": "causal_lm", "train_file": train})
    assert data.label_names == [] and set(data.train[0]) == {"prompt", "response"}
    item = tokenize_split(data.train[:1], tokenizer, "causal_lm", 64)[0]
    prompt = tokenizer(data.train[0]["prompt"], add_special_tokens=False)["input_ids"]
    ids, labels = item["input_ids"], item["labels"]
    assert ids[:len(prompt)] == prompt and ids[-1] == tokenizer.sep_token_id            # ... + response + eos
    assert labels[:len(prompt) - 1] == [IGNORE_INDEX] * (len(prompt) - 1)              # the prompt is not learned
    assert labels[len(prompt) - 1:-1] == ids[len(prompt):] and labels[-1] == IGNORE_INDEX   # logits at t predict t+1
    batch = make_collate_fn(tokenizer, "causal_lm")([item, tokenize_split(data.train[1:2], tokenizer, "causal_lm", 64)[0]])
    assert batch["labels"].shape == batch["input_ids"].shape


def test_a_method_without_the_task_is_refused_before_any_work(tmp_path, capsys):
    train, validation = _files(tmp_path)
    out = tmp_path / "run"
    assert main(small_args(out, method="pee_kd", task="causal_lm", train_file=train, validation_file=validation,
                           teacher_model_name_or_path="t", model_name_or_path="s")) == 2
    assert "method pee_kd does not support task causal_lm" in capsys.readouterr().err
    assert not out.exists()


def test_vanilla_kd_on_a_causal_lm(tmp_path):
    train, validation = _files(tmp_path)
    (teacher, student), _ = _models(tmp_path)
    out = tmp_path / "run"
    flags = small_args(out, method="tests.train.test_causal_lm:GreedyLength", task="causal_lm", train_file=train,
                       validation_file=validation, teacher_model_name_or_path=teacher, model_name_or_path=student,
                       max_seq_length=48, per_device_train_batch_size=8)
    assert main(flags) == 0
    results = read_json(out / "eval_results.json")
    assert 0.0 <= results["eval_accuracy"] <= 1.0 and results["eval_loss"] > 0
    assert results["eval_greedy_new_tokens"] == 5.0
    assert "teacher" in read_json(out / "teacher_results.json")                       # used as is: an LM head
    assert not (out / "teacher").exists()
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert any("kd_loss" in r for r in rows)
    assert GPT2LMHeadModel.from_pretrained(out).config.n_layer == 1
