"""kdengine.runtime.ExpertRuntime and python -m kdengine.infer on a hand-built PEE-KD output directory
(a tiny BERT teacher, 3 random prefix experts, a random backbone-feature selector)."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
import yaml

from kdengine.experts import PromptExperts
from kdengine.methods.selector import ExpertSelector, backbone_features, expert_scores, selector_logits
from kdengine.models import AUTO_CLASSES, load_tokenizer
from kdengine.ops import fuse_experts
from kdengine.runtime import ExpertRuntime
from kdengine.tiny_models import build_tiny_models

K = 3
VOCAB = "good bad fine awful great poor movie plot acting the a was very not".split()
TEXTS = ["good movie", "the plot was very very poor and the acting was not great", "bad",
         "a fine movie the acting was great", "awful", "the movie was not good not bad not fine"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def output_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("pee_kd")
    torch.manual_seed(0)
    teacher, _ = build_tiny_models(str(out), task="sequence_classification", label_names=["negative", "positive"],
                                   vocab=VOCAB)
    model = AUTO_CLASSES["sequence_classification"].from_pretrained(teacher)
    experts = PromptExperts(model, K, 2, kind="prefix", seed=0, backend="torch")
    with torch.no_grad():                 # random heads differ too little to route: spread the experts
        experts.prompts.mul_(4.0)
    experts.save_pretrained(str(out / "experts"))
    selector = ExpertSelector(model.config.hidden_size, K, 8)
    tokenizer = load_tokenizer(teacher, "teacher")
    enc = tokenizer(TEXTS, padding=True, return_tensors="pt")
    features = backbone_features(model.eval(), enc["input_ids"], enc["attention_mask"])
    with torch.no_grad():                 # a random tiny backbone's [CLS] states barely differ: centre and scale
        selector.mlp[0].weight.mul_(50.0)
        selector.mlp[0].bias.copy_(-selector.mlp[0].weight @ features.mean(0))
    selector.save_pretrained(str(out / "selector"))
    (out / "config.yaml").write_text(yaml.safe_dump({"method": "pee_kd", "task": "sequence_classification",
                                                     "teacher_backbone": "frozen", "fusion_space": "logit",
                                                     "max_seq_length": 32}))
    return out


@pytest.fixture(scope="module")
def runtime(output_dir):
    return ExpertRuntime.from_pretrained(str(output_dir), kernel_backend="torch")


def _alone(runtime, text, expert):
    """The chosen expert's own forward on one unpadded example."""
    enc = runtime.tokenizer([text], return_tensors="pt")
    logits = runtime.experts(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                             experts=torch.tensor([expert])).logits
    return logits[0].float().softmax(-1)


def test_routed_predictions_equal_the_chosen_experts_own_forward(runtime):
    preds = runtime.predict(TEXTS, batch_size=4)
    assert [len(p.experts) for p in preds] == [1] * len(TEXTS)
    assert len({p.experts[0] for p in preds}) > 1                     # routing differs between inputs
    for text, pred in zip(TEXTS, preds):
        torch.testing.assert_close(torch.tensor(pred.probabilities), _alone(runtime, text, pred.experts[0]))
        assert pred.weights == [1.0]
        assert pred.label == runtime.label_names[int(torch.tensor(pred.probabilities).argmax())]
    fixed = runtime.predict(TEXTS, routing="fixed:2", batch_size=4)
    for text, pred in zip(TEXTS, fixed):
        assert pred.experts == [2]
        torch.testing.assert_close(torch.tensor(pred.probabilities), _alone(runtime, text, 2))


def test_top_k_equal_to_k_is_the_selector_weighted_ensemble(runtime):
    enc = runtime.tokenizer(TEXTS, padding=True, return_tensors="pt")
    every = runtime.experts(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits   # [K, B, C]
    probs = selector_logits(runtime.selector, runtime.experts.model, enc["input_ids"], enc["attention_mask"],
                            token_type_ids=enc["token_type_ids"]).softmax(-1)
    want, _, _ = fuse_experts(every.float(), weights=probs, space="logit", backend="torch")
    got = runtime.predict(TEXTS, top_k=K, batch_size=2)
    torch.testing.assert_close(torch.tensor([p.probabilities for p in got]), want.exp(), atol=1e-5, rtol=1e-5)
    for pred, p in zip(got, probs):
        assert sorted(pred.experts) == list(range(K))
        torch.testing.assert_close(torch.tensor(pred.weights), p[pred.experts])
    uniform, _, _ = fuse_experts(every.float(), weighting="uniform", space="logit", backend="torch")
    every_pred = runtime.predict(TEXTS, routing="all")
    torch.testing.assert_close(torch.tensor([p.probabilities for p in every_pred]), uniform.exp(),
                               atol=1e-5, rtol=1e-5)


def test_order_is_kept_for_mixed_lengths_and_runs_are_deterministic(runtime):
    one_by_one = [runtime.predict([t], top_k=2)[0] for t in TEXTS]
    batched = runtime.predict(TEXTS, top_k=2, batch_size=3)
    assert batched == runtime.predict(TEXTS, top_k=2, batch_size=3)
    for single, many in zip(one_by_one, batched):
        assert single.experts == many.experts and single.label == many.label
        torch.testing.assert_close(torch.tensor(single.probabilities), torch.tensor(many.probabilities))


def test_oracle_routes_to_the_most_reliable_expert(runtime):
    labels = ["positive", "negative", "negative", "positive", "negative", 1]
    preds = runtime.predict(TEXTS, routing="oracle", labels=labels)
    enc = runtime.tokenizer(TEXTS, padding=True, return_tensors="pt")
    every = runtime.experts(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    best = expert_scores(every, torch.tensor([1, 0, 0, 1, 0, 1])).argmax(-1)
    assert [p.experts[0] for p in preds] == best.tolist()


@pytest.mark.parametrize("kwargs, message", [
    (dict(top_k=0), r"top_k=0 must be an integer in \[1, 3\]"),
    (dict(top_k=4), r"top_k=4 must be an integer in \[1, 3\]"),
    (dict(routing="oracle"), "routing 'oracle' needs the true labels"),
    (dict(routing="fixed:3"), "expert 3 does not exist"),
    (dict(routing="all", top_k=2), "top_k applies to routing"),
    (dict(routing="best"), "unknown routing 'best'"),
    (dict(routing="oracle", labels=["positive"]), "1 labels for 2 inputs"),
    (dict(routing="oracle", labels=["positive", "maybe"]), r"labels\[1\] = 'maybe'"),
])
def test_bad_arguments_are_refused(runtime, kwargs, message):
    with pytest.raises(ValueError, match=message):
        runtime.predict(["good", "bad"], **kwargs)


def test_directories_without_experts_or_selector(output_dir, tmp_path):
    with pytest.raises(ValueError, match="no config.yaml"):
        ExpertRuntime.from_pretrained(str(tmp_path))
    (tmp_path / "config.yaml").write_text((output_dir / "config.yaml").read_text())
    with pytest.raises(ValueError, match="has no trained experts"):
        ExpertRuntime.from_pretrained(str(tmp_path))
    for name in ("teacher", "experts"):
        os.symlink(output_dir / name, tmp_path / name)
    no_selector = ExpertRuntime.from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="has no selector"):
        no_selector.predict(["good"])
    assert no_selector.predict(["good"], routing="fixed:1")[0].experts == [1]


def _infer(output_dir, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", "kdengine.infer", "--model", str(output_dir), *args],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


def test_infer_cli_writes_predictions_in_input_order(runtime, output_dir, tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"sentence": t}) + "\n" for t in TEXTS))
    preds = tmp_path / "preds.jsonl"
    done = _infer(output_dir, "--input", str(source), "--output", str(preds), "--top_k", "2")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    want = runtime.predict(TEXTS, top_k=2)
    assert [r["label"] for r in rows] == [p.label for p in want]
    assert [r["experts"] for r in rows] == [p.experts for p in want]
    assert [r["text"] for r in rows] == TEXTS


@pytest.mark.parametrize("name, content, message", [
    ("in.jsonl", '{"sentence": "good"}\n{"text": "bad"}\n', r"in\.jsonl:2: text_column='sentence' not found"),
    ("in.tsv", "text\nbad\n", r"in\.tsv: text_column='sentence' not found"),
])
def test_infer_cli_names_the_file_and_line_of_a_missing_field(output_dir, tmp_path, name, content, message):
    source = tmp_path / name
    source.write_text(content)
    done = _infer(output_dir, "--input", str(source), "--output", str(tmp_path / "p.jsonl"))
    assert done.returncode == 2
    assert re.search(message, done.stderr), done.stderr
    assert not (tmp_path / "p.jsonl").exists()
