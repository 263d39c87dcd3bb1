"""compute_metrics: accuracy with ignored positions, seqeval entity scores (default and strict), errors."""

import numpy as np
import pytest

from kdengine.metrics import compute_metrics

TAGS = ["O", "B-MISC", "I-MISC", "B-PER", "I-PER"]


def ids(tags):
    return [TAGS.index(t) for t in tags]


def pad(rows, width, value=-100):
    return np.array([row + [value] * (width - len(row)) for row in rows])


def test_accuracy_ignores_minus_100():
    preds = np.array([1, 0, 1, 1, 2])
    refs = np.array([1, 1, -100, 1, 2])
    assert compute_metrics("sequence_classification", preds, refs, ["a", "b", "c"]) == {"accuracy": 0.75}


def test_entity_scores_hand_computed():
    # gold: MISC(3..5), PER(0..1); predicted: MISC(2..5) (wrong span), PER(0..1) (right)
    gold = [ids(["O", "O", "O", "B-MISC", "I-MISC", "I-MISC", "O"]), ids(["B-PER", "I-PER", "O"])]
    pred = [ids(["O", "O", "B-MISC", "I-MISC", "I-MISC", "I-MISC", "O"]), ids(["B-PER", "I-PER", "O"])]
    refs, preds = pad(gold, 9), pad(pred, 9, value=0)  # predictions on padding must not count
    out = compute_metrics("token_classification", preds, refs, TAGS)
    # tokens 2 (O vs B-MISC) and 3 (B-MISC vs I-MISC) differ: 8 of 10 right
    assert out == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "accuracy": 8 / 10})


def test_default_mode_is_conlleval_strict_is_iob2():
    refs = np.array([ids(["B-PER", "I-PER", "O", "B-MISC"])])
    preds = np.array([ids(["I-PER", "I-PER", "O", "B-MISC"])])  # ill-formed start of the PER span
    default = compute_metrics("token_classification", preds, refs, TAGS)
    strict = compute_metrics("token_classification", preds, refs, TAGS, strict=True)
    assert default["f1"] == 1.0 and default["accuracy"] == 0.75
    # strict: only MISC counts as predicted -> precision 1/1, recall 1/2
    assert strict == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "accuracy": 0.75})


def test_ignored_subtokens_are_removed_before_seqeval():
    # -100 between the word labels (continuation sub-tokens) must not split the entity
    refs = np.array([[-100, TAGS.index("B-PER"), -100, TAGS.index("I-PER"), -100]])
    preds = np.array([[0, TAGS.index("B-PER"), 0, TAGS.index("I-PER"), 0]])
    out = compute_metrics("token_classification", preds, refs, TAGS, strict=True)
    assert out == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "accuracy": 1.0}


def test_random_batches_match_seqeval_on_lists():
    from seqeval.metrics import classification_report

    rng = np.random.default_rng(0)
    refs = rng.integers(0, len(TAGS), size=(20, 15))
    preds = np.where(rng.random(refs.shape) < 0.7, refs, rng.integers(0, len(TAGS), size=refs.shape))
    lengths = rng.integers(1, 16, size=20)
    for row, n in zip(refs, lengths):
        row[n:] = -100
    out = compute_metrics("token_classification", preds, refs, TAGS)
    truth = [[TAGS[t] for t in row[:n]] for row, n in zip(refs, lengths)]
    guess = [[TAGS[t] for t in row[:n]] for row, n in zip(preds, lengths)]
    micro = classification_report(truth, guess, output_dict=True)["micro avg"]
    assert out["precision"] == pytest.approx(micro["precision"]) and out["recall"] == pytest.approx(
        micro["recall"]
    )
    assert out["f1"] == pytest.approx(micro["f1-score"]) and 0 < out["f1"] < 1
    labeled = refs != -100
    assert out["accuracy"] == pytest.approx((preds[labeled] == refs[labeled]).mean())


@pytest.mark.parametrize(
    "task,preds,refs,match",
    [
        ("regression", [0], [0], "unknown task"),
        ("sequence_classification", [0, 1], [0], "same shape"),
        ("sequence_classification", [[0]], [[0]], r"same shape \[N\]"),
        ("token_classification", [0, 1], [0, 1], r"same shape \[N, L\]"),
        ("sequence_classification", [0.5, 1.0], [0, 1], "integer array of label ids"),
        ("sequence_classification", [0, 5], [0, 1], "predictions contains label id 5, outside"),
        ("sequence_classification", [0, 1], [0, -3], "references contains label id -3"),
        ("sequence_classification", [0, 1], [-100, -100], "no labeled positions"),
    ],
)
def test_bad_inputs(task, preds, refs, match):
    with pytest.raises(ValueError, match=match):
        compute_metrics(task, np.array(preds), np.array(refs), ["a", "b"])
