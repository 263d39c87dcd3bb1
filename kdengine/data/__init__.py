"""The trainer's data layer: load a task's splits, tokenize them, collate batches.

* :func:`load_task_data` — local files, a hub dataset, or (no source given) the embedded
  synthetic multi-domain sentiment task; returns a :class:`TaskData` with label ids.
* :func:`tokenize_split`, :func:`make_collate_fn` — in :mod:`kdengine.data.tokenize`.

Readers live in :mod:`kdengine.data.readers`, the synthetic task in
:mod:`kdengine.data.synthetic`. ``datasets`` is imported only when a hub dataset is asked for.
"""

from __future__ import annotations

from dataclasses import dataclass

from kdengine.constants import TASKS

__all__ = ["TaskData", "load_task_data", "tokenize_split", "make_collate_fn"]


@dataclass
class TaskData:
    """All splits of one task, labels already ids into ``label_names``.

    Sequence classification example: ``{"text": str, "text_pair": str | None, "label": int | None,
    "domain": str | None}`` (label None only in an unlabeled test split). Token classification
    example: ``{"tokens": list[str], "tags": list[int]}`` (IOB2 tag ids). Causal LM example:
    ``{"prompt": str, "response": str}`` (``label_names`` is empty).
    """

    task: str  # "sequence_classification" | "token_classification" | "causal_lm"
    label_names: list[str]
    train: list[dict]
    validation: list[dict] | None
    test: list[dict] | None


def _option(obj, name: str, default=None):
    """Read an option from a config object, a namespace or a mapping."""
    if obj is None:
        return default
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _check_count(name: str, value) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
    return value


def load_task_data(args) -> TaskData:
    """Load the task named by ``args`` (a config object, namespace or dict).

    Source, in order: ``train_file`` (+ optional ``validation_file`` / ``test_file``: TSV/CSV/
    JSONL by extension for sequence classification, CoNLL for token classification), else
    ``dataset_name`` / ``dataset_config_name`` through ``datasets.load_dataset``, else the
    synthetic task (sequence classification; for ``causal_lm`` the same reviews as instructions,
    :func:`kdengine.data.synthetic.make_synthetic_instruction_task`) with the ``synthetic`` options
    (``n_train``, ``n_validation``, ``n_test``, ``noise``; an object or a dict) and ``seed``.

    Column options: ``text_column`` (default "sentence"), ``text_pair_column`` (None),
    ``label_column`` ("label"); for ``causal_lm`` (local files only) ``text_column`` is the prompt
    (default "prompt") and ``label_column`` the response ("response"), and there is no label set. The label set comes from the training split (sorted; the hub's
    ClassLabel order when it has one). ``max_train_samples`` / ``max_eval_samples`` keep the
    FIRST N examples of the train / validation and test splits (as the Hugging Face example
    scripts do: deterministic, no shuffle). Every problem is a ValueError raised here, before
    any training.
    """
    from kdengine.data import readers

    task = _option(args, "task", "sequence_classification")
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    max_train = _check_count("max_train_samples", _option(args, "max_train_samples"))
    max_eval = _check_count("max_eval_samples", _option(args, "max_eval_samples"))
    train_file = _option(args, "train_file")
    dataset_name = _option(args, "dataset_name")
    eval_files = {"validation": _option(args, "validation_file"), "test": _option(args, "test_file")}
    columns = dict(
        text_column=_option(args, "text_column") or ("prompt" if task == "causal_lm" else "sentence"),
        text_pair_column=_option(args, "text_pair_column"),
        label_column=_option(args, "label_column") or ("response" if task == "causal_lm" else "label"),
    )

    if train_file and dataset_name:
        raise ValueError(
            f"give either train_file ({train_file!r}) or dataset_name ({dataset_name!r}), not both"
        )
    if not train_file and any(eval_files.values()):
        given = [f"{k}_file" for k, v in eval_files.items() if v]
        raise ValueError(
            f"{', '.join(given)} given without train_file: the label set comes from the training split"
        )

    if train_file:
        raw = {"train": readers.read_split(train_file, task, **columns)}
        for split, path in eval_files.items():
            if path:
                raw[split] = readers.read_split(path, task, labels_required=split != "test", **columns)
    elif dataset_name:
        if task == "causal_lm":
            raise ValueError("causal_lm reads local files (train_file=..., .jsonl with prompt/response columns); "
                             "dataset_name is not supported for it")
        raw = readers.load_hub_splits(dataset_name, _option(args, "dataset_config_name"), task, **columns)
    else:
        if task == "token_classification":
            raise ValueError(
                "no data source given and the synthetic task is sequence classification only (and causal_lm: "
                "the same reviews as instructions); "
                "pass train_file=... (CoNLL) or dataset_name=... for token classification"
            )
        from kdengine.data.synthetic import make_synthetic_instruction_task, make_synthetic_task

        options = _option(args, "synthetic")
        kwargs = {k: _option(options, k) for k in ("n_train", "n_validation", "n_test", "noise")}
        make = make_synthetic_instruction_task if task == "causal_lm" else make_synthetic_task
        data = make(seed=_option(args, "seed", 0), **{k: v for k, v in kwargs.items() if v is not None})
        return _subsample(data, max_train, max_eval)

    if task == "causal_lm":                      # no label set: the targets are the response tokens
        label_names, splits = [], {name: split.examples for name, split in raw.items()}
    else:
        label_names = readers.label_set(raw["train"], task)
        splits = {name: readers.encode_labels(split, task, label_names) for name, split in raw.items()}
    data = TaskData(
        task=task,
        label_names=label_names,
        train=splits["train"],
        validation=splits.get("validation"),
        test=splits.get("test"),
    )
    return _subsample(data, max_train, max_eval)


def _subsample(data: TaskData, max_train: int | None, max_eval: int | None) -> TaskData:
    """Keep the first ``max_train`` train and ``max_eval`` validation/test examples."""

    def head(examples, n):
        return examples if examples is None or n is None else examples[:n]

    data.train = head(data.train, max_train)
    data.validation = head(data.validation, max_eval)
    data.test = head(data.test, max_eval)
    return data


def __getattr__(name):
    if name in ("tokenize_split", "make_collate_fn"):
        from kdengine.data import tokenize

        return getattr(tokenize, name)
    raise AttributeError(f"module 'kdengine.data' has no attribute {name!r}")
