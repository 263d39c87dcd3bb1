"""Evaluation metrics: accuracy for sequence classification, seqeval entity scores for NER.

Token classification uses seqeval's default (conlleval-compatible) evaluation: an "I-X" that
does not continue an entity starts one, as in the CoNLL-2003 ``conlleval`` script that published
NER numbers (and PEE-KD's evaluation) use. ``strict=True`` switches to seqeval's strict IOB2 mode
(only well-formed B-X I-X... spans count). seqeval is imported only when NER is scored.
"""

from __future__ import annotations

import numpy as np

from kdengine.constants import IGNORE_INDEX, TASKS


def _as_int_array(name: str, values) -> np.ndarray:
    array = np.asarray(values)
    if array.dtype == object or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(
            f"{name} must be an integer array of label ids (rectangular, padded with -100), "
            f"got dtype {array.dtype}"
        )
    return array


def _check_ids(name: str, ids: np.ndarray, num_labels: int) -> None:
    bad = ids[(ids < 0) | (ids >= num_labels)]
    if bad.size:
        raise ValueError(
            f"{name} contains label id {int(bad[0])}, outside [0, {num_labels}) for {num_labels} label names"
        )


def compute_metrics(
    task: str, predictions, references, label_names: list[str], *, strict: bool = False
) -> dict:
    """Score predicted label ids against reference label ids; positions with reference -100 are ignored.

    * ``sequence_classification``: predictions/references [N] -> ``{"accuracy"}``.
    * ``token_classification``: predictions/references [N, L] (padded with -100 in the references)
      -> ``{"precision", "recall", "f1"}`` (seqeval micro average over entities, IOB2 tags) and
      ``{"accuracy"}`` (token accuracy over the scored positions).
    * ``causal_lm``: predicted/reference next-token ids [N, L] (-100 off the responses) ->
      ``{"accuracy"}`` (next-token accuracy on the responses); ``label_names`` is not used.

    Values are python floats in [0, 1]. Raises ValueError on shape mismatch, ids outside
    ``label_names``, or when no position is labeled.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    predictions = _as_int_array("predictions", predictions)
    references = _as_int_array("references", references)
    expected_ndim = 1 if task == "sequence_classification" else 2
    if references.ndim != expected_ndim or predictions.shape != references.shape:
        raise ValueError(
            f"{task}: expected predictions and references of the same shape "
            f"{'[N]' if expected_ndim == 1 else '[N, L]'}, got {predictions.shape} and {references.shape}"
        )
    keep = references != IGNORE_INDEX
    if not keep.any():
        raise ValueError(
            "no labeled positions: every reference is -100 (an unlabeled split cannot be scored)"
        )
    if task == "causal_lm":
        return {"accuracy": float((predictions[keep] == references[keep]).mean())}
    _check_ids("references", references[keep], len(label_names))
    _check_ids("predictions", predictions[keep], len(label_names))

    if task == "sequence_classification":
        return {"accuracy": float((predictions[keep] == references[keep]).mean())}

    from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score
    from seqeval.scheme import IOB2

    names = np.asarray(label_names, dtype=object)
    y_true = [list(names[r[k]]) for r, k in zip(references, keep) if k.any()]
    y_pred = [list(names[p[k]]) for p, k in zip(predictions, keep) if k.any()]
    mode = dict(mode="strict", scheme=IOB2) if strict else {}
    return {
        "precision": float(precision_score(y_true, y_pred, zero_division=0, **mode)),
        "recall": float(recall_score(y_true, y_pred, zero_division=0, **mode)),
        "f1": float(f1_score(y_true, y_pred, zero_division=0, **mode)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
    }
