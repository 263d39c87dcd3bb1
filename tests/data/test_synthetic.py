"""The embedded synthetic task (semantics, determinism, difficulty) and the tiny models built for it."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kdengine.data import load_task_data, make_collate_fn, tokenize_split
from kdengine.data import synthetic as S
from kdengine.data.synthetic import make_synthetic_task, synthetic_vocab
from kdengine.tiny_models import build_tiny_models


@pytest.fixture(scope="module")
def task():
    return make_synthetic_task(seed=0)


def _polarity(word: str, domain: str) -> int:
    """Independent reading of the lexicon: the polarity of an adjective in a domain."""
    if word in S._FLIP_WORDS:
        return S._FLIP_WORDS[word][domain]
    for polar in (S._SHARED, S._DOMAIN_WORDS[domain]):
        for polarity, words in polar.items():
            if word in words:
                return polarity
    raise AssertionError(f"{word!r} is not an adjective of domain {domain}")


def _rule_label(example: dict) -> int:
    """The label a reader who knows the rules gives: last clause decides, "not" negates."""
    words = example["text"].split()
    assert words[-1] == "."
    if "but" in words:
        words = words[words.index("but") + 1 :]
    clause = words[:-1]
    if "and" in clause:
        clause = clause[clause.index("and") + 1 :]
    return _polarity(clause[-1], example["domain"]) ^ ("not" in clause)


def _logistic_regression_accuracy(train_feats, train_y, valid_feats, valid_y, features) -> float:
    """Bag-of-features logistic regression (full-batch gradient descent, L2); validation accuracy.

    The design matrix is kept sparse as (row, column) pairs: bincount instead of BLAS, so the
    test stays fast on a loaded 2-core machine.
    """
    index = {f: i for i, f in enumerate(features)}
    bias = len(index)

    def pairs(examples):
        rows, cols = [], []
        for r, feats in enumerate(examples):
            known = [index[f] for f in feats if f in index] + [bias]
            rows += [r] * len(known)
            cols += known
        return np.array(rows), np.array(cols)

    rows, cols = pairs(train_feats)
    y = np.asarray(train_y, dtype=float)
    w = np.zeros(bias + 1)
    for _ in range(800):
        p = 1.0 / (1.0 + np.exp(-np.bincount(rows, weights=w[cols], minlength=len(y))))
        w -= 0.5 * (np.bincount(cols, weights=(p - y)[rows], minlength=len(w)) / len(y) + 1e-3 * w)
    vrows, vcols = pairs(valid_feats)
    scores = np.bincount(vrows, weights=w[vcols], minlength=len(valid_y))
    return float(((scores > 0) == np.asarray(valid_y, dtype=bool)).mean())


def _context_features(example):
    """Clause after "but", "not" merged into the next adjective, crossed with the domain."""
    words = example["text"].split()
    if "but" in words:
        words = words[words.index("but") + 1 :]
    out, negated = [], False
    for w in words:
        if w == "not":
            negated = True
        elif w not in S._INTENSIFIERS:
            out.append(("not_" if negated else "") + w + "|" + example["domain"])
    return out


def test_shape_and_balance(task):
    assert task.task == "sequence_classification" and task.label_names == ["negative", "positive"]
    assert (len(task.train), len(task.validation), len(task.test)) == (3000, 600, 600)
    vocab = set(synthetic_vocab())
    for ex in task.train + task.validation + task.test:
        assert set(ex) == {"text", "text_pair", "label", "domain"} and ex["text_pair"] is None
        assert ex["label"] in (0, 1) and ex["domain"] in S.DOMAINS
        assert set(ex["text"].split()) <= vocab
    labels = np.array([ex["label"] for ex in task.train])
    assert 0.45 < labels.mean() < 0.55
    domains = [ex["domain"] for ex in task.train]
    assert all(600 < domains.count(d) < 900 for d in S.DOMAINS)
    assert synthetic_vocab() == sorted(vocab) and len(vocab) == len(synthetic_vocab())


def test_phenomena_occur(task):
    texts = [ex["text"].split() for ex in task.train]
    share = {w: np.mean([w in t for t in texts]) for w in ("but", "not", "and")}
    assert 0.15 < share["but"] < 0.25 and 0.1 < share["not"] < 0.3 and 0.05 < share["and"] < 0.2
    assert np.mean([any(w in S._FLIP_WORDS for w in t) for t in texts]) > 0.15
    # the sentence after "but" mostly contradicts the first clause
    contrast = [ex for ex in task.train if "but" in ex["text"].split()]
    first = [
        _polarity(ex["text"].split()[ex["text"].split().index("but") - 1], ex["domain"])
        ^ ("not" in ex["text"].split()[: ex["text"].split().index("but")])
        for ex in contrast
    ]
    assert np.mean([f != _rule_label(ex) for f, ex in zip(first, contrast)]) > 0.7


def test_clean_labels_follow_the_rules_and_noise_is_a_few_percent():
    clean = make_synthetic_task(seed=3, n_train=3000, n_validation=0, n_test=0, noise=0.0)
    noisy = make_synthetic_task(seed=3, n_train=3000, n_validation=0, n_test=0)
    assert clean.validation is None and clean.test is None
    assert [ex["text"] for ex in clean.train] == [ex["text"] for ex in noisy.train]
    assert all(_rule_label(ex) == ex["label"] for ex in clean.train)
    flipped = np.mean([a["label"] != b["label"] for a, b in zip(clean.train, noisy.train)])
    assert 0.015 < flipped < 0.05


def test_deterministic_and_split_streams_independent():
    a = make_synthetic_task(seed=7, n_train=50, n_validation=20, n_test=20)
    b = make_synthetic_task(seed=7, n_train=80, n_validation=20, n_test=20)
    c = make_synthetic_task(seed=8, n_train=50, n_validation=20, n_test=20)
    assert a.train == b.train[:50] and a.validation == b.validation and a.test == b.test
    assert a.train != c.train and a.validation != a.test


def test_bag_of_words_is_clearly_below_context(task):
    """Word counts are not enough; features that read the context get near the noise ceiling."""
    ty, vy = [ex["label"] for ex in task.train], [ex["label"] for ex in task.validation]
    words = [ex["text"].split() for ex in task.train], [ex["text"].split() for ex in task.validation]
    bow = _logistic_regression_accuracy(*words[:1], ty, *words[1:], vy, synthetic_vocab())
    ctx = [[_context_features(ex) for ex in split] for split in (task.train, task.validation)]
    features = sorted({f for feats in ctx[0] for f in feats})
    context = _logistic_regression_accuracy(ctx[0], ty, ctx[1], vy, features)
    assert 0.65 < bow < 0.88, bow
    assert context > 0.9 and context > bow + 0.1, (bow, context)


def test_load_task_data_defaults_to_synthetic():
    options = {"n_train": 40, "n_validation": 10, "n_test": 0}
    data = load_task_data(
        SimpleNamespace(
            task="sequence_classification",
            seed=5,
            synthetic=options,
            max_train_samples=30,
            max_eval_samples=None,
        )
    )
    assert data.train == make_synthetic_task(5, 40, 10, 0).train[:30] and data.test is None
    assert len(data.validation) == 10
    data = load_task_data(
        {"seed": 1, "synthetic": SimpleNamespace(n_train=5, n_validation=2, n_test=2, noise=0.0)}
    )
    assert data.train == make_synthetic_task(1, 5, 2, 2, noise=0.0).train


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(n_train=0), "n_train must be >= 1"),
        (dict(n_test=-1), "n_test must be an integer >= 0"),
        (dict(noise=0.5), r"noise must be in \[0, 0.5\)"),
        (dict(seed=None), "seed must be an integer"),
    ],
)
def test_synthetic_bad_options(kw, match):
    with pytest.raises(ValueError, match=match):
        make_synthetic_task(**{"seed": 0, **kw})


# ---------------------------------------------------------------- tiny models


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, task):
    out = tmp_path_factory.mktemp("tiny")
    return build_tiny_models(
        str(out), task=task.task, label_names=task.label_names, vocab=synthetic_vocab(), seed=11
    )


def test_tiny_models_load_offline_and_run(tiny_dirs):
    teacher, student = tiny_dirs
    for path in tiny_dirs:
        assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(
            os.listdir(path)
        )
    code = f"""
import json, torch
from transformers import AutoTokenizer, AutoModelForSequenceClassification
out = {{}}
for role, path in (("teacher", {teacher!r}), ("student", {student!r})):
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    batch = tok(["the plot is not gripping .", "my kettle was great"], ["this lid is dull .", "zebra"],
                padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    cfg = model.config
    out[role] = dict(shape=list(logits.shape), finite=bool(torch.isfinite(logits).all()), fast=tok.is_fast,
                     layers=cfg.num_hidden_layers, hidden=cfg.hidden_size, heads=cfg.num_attention_heads,
                     id2label=cfg.id2label, ids=batch["input_ids"][0].tolist(),
                     types=batch["token_type_ids"][0].tolist(),
                     unk=batch["input_ids"][1].tolist().count(tok.unk_token_id))
print(json.dumps(out))
"""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert (out["teacher"]["layers"], out["teacher"]["hidden"], out["teacher"]["heads"]) == (4, 128, 4)
    assert (out["student"]["layers"], out["student"]["hidden"], out["student"]["heads"]) == (2, 64, 2)
    for role in out.values():
        assert role["shape"] == [2, 2] and role["finite"] and role["fast"]
        assert role["id2label"] == {"0": "negative", "1": "positive"}
        # [CLS] a [SEP] b [SEP] with segment ids 0 then 1; only "zebra" is out of vocabulary
        assert role["ids"][0] == 2 and role["ids"].count(3) == 2
        assert role["types"] == [0] * 8 + [1] * 6
        assert role["unk"] == 1


def test_tiny_models_tokenize_collate_forward(tiny_dirs, task):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dirs[1])
    model = AutoModelForSequenceClassification.from_pretrained(tiny_dirs[1])
    ds = tokenize_split(task.validation[:16], tok, task.task, 12)
    assert all(tok.unk_token_id not in item["input_ids"] for item in ds.items)
    assert max(len(item["input_ids"]) for item in ds.items) == 12 and ds[3]["example_id"] == 3
    for i in range(16):  # [CLS] words [SEP], the words cut to 10 so that the 12 tokens fit
        words = task.validation[i]["text"].split()
        assert ds[i]["input_ids"] == [2, *tok.convert_tokens_to_ids(words)[:10], 3]
    batch = make_collate_fn(tok, task.task)([ds[i] for i in range(8)])
    assert batch["labels"].tolist() == [ex["label"] for ex in task.validation[:8]]
    lengths = batch["attention_mask"].sum(1)
    for i in range(8):
        assert batch["input_ids"][i, lengths[i] :].eq(tok.pad_token_id).all()
        assert batch["input_ids"][i, : lengths[i]].tolist() == ds[i]["input_ids"]
    model_inputs = {k: v for k, v in batch.items() if k != "example_id"}
    loss = model(**model_inputs).loss
    loss.backward()
    assert torch.isfinite(loss) and model.classifier.weight.grad.abs().sum() > 0


def test_the_domain_column_reaches_the_batch(tiny_dirs, task):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dirs[1])
    domains = sorted({ex["domain"] for ex in task.train})
    assert domains == sorted(S.DOMAINS)
    ds = tokenize_split(task.validation[:8], tok, task.task, 12, domain_names=domains)
    batch = make_collate_fn(tok, task.task)([ds[i] for i in range(8)])
    assert batch["domain"].tolist() == [domains.index(ex["domain"]) for ex in task.validation[:8]]
    assert "domain" not in tokenize_split(task.validation[:8], tok, task.task, 12)[0]
    with pytest.raises(ValueError, match=r"example 0: domain 'books' is not one of the domains \['kitchen'\]"):
        tokenize_split([{**task.validation[0], "domain": "books"}], tok, task.task, 12, domain_names=["kitchen"])


def test_tiny_models_deterministic_token_task_and_errors(tmp_path):
    from safetensors.torch import load_file

    labels = ["O", "B-X", "I-X"]
    a = build_tiny_models(
        str(tmp_path / "a"),
        task="token_classification",
        label_names=labels,
        vocab=["x", "y"],
        teacher=dict(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64),
        student=dict(hidden_size=16, intermediate_size=32),
        seed=4,
    )
    b = build_tiny_models(
        str(tmp_path / "b"),
        task="token_classification",
        label_names=labels,
        vocab=["x", "y"],
        teacher=dict(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64),
        student=dict(hidden_size=16, intermediate_size=32),
        seed=4,
    )
    for pa, pb in zip(a, b):
        wa, wb = (
            load_file(os.path.join(pa, "model.safetensors")),
            load_file(os.path.join(pb, "model.safetensors")),
        )
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
        assert json.load(open(os.path.join(pa, "config.json")))["architectures"] == [
            "BertForTokenClassification"
        ]
    teacher_w, student_w = (load_file(os.path.join(p, "model.safetensors")) for p in a)
    assert teacher_w["classifier.weight"].shape == (3, 32) and student_w["classifier.weight"].shape == (3, 16)

    common = dict(task="sequence_classification", label_names=["a", "b"], vocab=["x"])
    for kw, match in [
        (dict(task="ranking"), "unknown task"),
        (dict(label_names=["a"]), "at least 2 distinct"),
        (dict(vocab=[]), "vocab is empty"),
        (dict(vocab=["x", "[PAD]"]), "special tokens"),
        (dict(vocab=["x", "x"]), "duplicate"),
        (dict(vocab=["a b"]), "without whitespace"),
        (dict(teacher=dict(hidden_sise=8)), "unknown BertConfig options"),
        (dict(student=dict(hidden_size=30, num_attention_heads=4)), "not a multiple"),
    ]:
        with pytest.raises(ValueError, match=match):
            build_tiny_models(str(tmp_path / "err"), **{**common, **kw})
