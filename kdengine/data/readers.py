"""Readers for task data: local TSV/CSV/JSONL (sequence classification), CoNLL (NER), the hub.

Every reader returns a :class:`RawSplit`: examples whose labels are still raw strings, plus where
each example came from (``file:line``), so that label errors can name the exact place. Labels
become ids in :func:`encode_labels`, from the label set of the TRAINING split only.

All errors are ``ValueError``s raised before any training starts: missing file (the path),
malformed line (``file:line`` and what was expected), missing column (the columns that exist),
empty split, a validation/test label the training split does not have.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from dataclasses import dataclass, field
from decimal import Decimal

CLASSIFICATION_EXTENSIONS = (".tsv", ".csv", ".jsonl")
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
_IOB2_TAG = re.compile(r"O|[BI]-\S+")


@dataclass
class RawSplit:
    """One split before label encoding.

    ``examples`` are dicts of the final shape except that "label" (sequence classification) is a
    raw string or None and "tags" (token classification) are raw tag strings. ``where[i]`` names
    the origin of example i ("path:line" or "dataset split[row]"). ``label_names`` is set only
    when the source fixes the label order itself (a hub ClassLabel feature).
    """

    source: str
    examples: list[dict]
    where: list[str]
    label_names: list[str] | None = field(default=None)


def _check_file(path: str) -> None:
    """An existing UTF-8 text file (ValueError naming it and, for bad bytes, where they are)."""
    if os.path.isdir(path):
        raise ValueError(f"data file {path!r} is a directory; expected a file")
    if not os.path.isfile(path):
        raise ValueError(f"data file not found: {path!r}")
    with open(path, "rb") as fh:
        data = fh.read()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte "
                         f"0x{data[exc.start]:02x} at offset {exc.start}); save the file as UTF-8") from None


def canonical_label(value) -> str:
    """A label as text, numbers in one spelling so that labels compare by value: "1", "1.0", "01",
    "1e0" and the JSON numbers 1 and 1.0 are all "1"; "0.50" is "0.5". Other text is stripped."""
    text = repr(value) if isinstance(value, float) else str(value).strip()
    if not _NUMBER.fullmatch(text):
        return text
    number = Decimal(text)
    return str(int(number)) if number == number.to_integral_value() else format(number.normalize(), "f")


def _raw_label(value, where: str) -> str:
    """Labels are kept as strings (:func:`canonical_label`): numbers compare by value, text is stripped."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)) \
            or (isinstance(value, float) and not (math.isfinite(value) and value.is_integer())):
        raise ValueError(f"{where}: a label must be a string or an integer (1.0 counts as 1), got {value!r}")
    text = canonical_label(value)
    if not text:
        raise ValueError(f"{where}: empty label")
    return text


def _text(value, column: str, where: str) -> str:
    """A text column's value: a non-empty string."""
    if not isinstance(value, str):
        raise ValueError(f"{where}: column {column!r} must be a string, got {value!r}")
    if not value.strip():
        raise ValueError(f"{where}: column {column!r} is empty; every example needs a text")
    return value


def _pick_columns(
    columns: list[str],
    path: str,
    text_column: str,
    text_pair_column: str | None,
    label_column: str,
    labels_required: bool,
) -> bool:
    """Check the requested columns exist; return whether the label column is present."""
    for name, column in (("text_column", text_column), ("text_pair_column", text_pair_column)):
        if column is not None and column not in columns:
            raise ValueError(f"{path}: {name}={column!r} not found; available columns: {columns}")
    if label_column in columns:
        return True
    if labels_required:
        raise ValueError(
            f"{path}: label_column={label_column!r} not found; available columns: {columns} "
            "(only a test file may have no labels)"
        )
    return False


def _rows_from_table(path: str, delimiter: str, quoting: int):
    """Yield (line_number, header, row) for a delimited file with a required header row."""
    kind = "tab" if delimiter == "\t" else "comma"
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
        header = next(reader, None)
        if not header:
            raise ValueError(f"{path}: empty file; expected a header row naming the columns")
        for row in reader:
            line = reader.line_num
            if not row:
                continue
            if len(row) != len(header):
                raise ValueError(
                    f"{path}:{line}: expected {len(header)} {kind}-separated columns "
                    f"{header}, found {len(row)}"
                )
            yield line, header, row


def _rows_from_jsonl(path: str):
    """Yield (line_number, keys, object) for a JSON-lines file (one object per non-blank line)."""
    with open(path, encoding="utf-8") as f:
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path}:{line}: invalid JSON ({e.msg}); expected one JSON object per line"
                ) from e
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{line}: expected a JSON object, got {type(obj).__name__}")
            yield line, list(obj), obj


def read_classification_file(
    path: str,
    *,
    text_column: str = "sentence",
    text_pair_column: str | None = None,
    label_column: str = "label",
    labels_required: bool = True,
) -> RawSplit:
    """Read a sequence-classification file; the format follows the extension.

    * ``.tsv``: tab-separated with a header row, read with quoting OFF (``csv.QUOTE_NONE``): GLUE
      TSVs contain unbalanced quote characters that would otherwise merge or split rows.
    * ``.csv``: comma-separated with a header row, standard CSV quoting.
    * ``.jsonl``: one JSON object per line; the keys are the columns.

    With ``labels_required=False`` (test files) a file without the label column is accepted and
    every label is None (e.g. the GLUE SST-2 test file).
    """
    _check_file(path)
    ext = os.path.splitext(path)[1].lower()
    if ext == ".tsv":
        rows = (
            (line, header, dict(zip(header, row)))
            for line, header, row in _rows_from_table(path, "\t", csv.QUOTE_NONE)
        )
    elif ext == ".csv":
        rows = (
            (line, header, dict(zip(header, row)))
            for line, header, row in _rows_from_table(path, ",", csv.QUOTE_MINIMAL)
        )
    elif ext == ".jsonl":
        rows = _rows_from_jsonl(path)
    else:
        raise ValueError(
            f"{path}: unsupported file extension {ext!r}; expected one of "
            f"{', '.join(CLASSIFICATION_EXTENSIONS)} for sequence classification"
        )
    examples, where = [], []
    has_label = None
    checked_columns = None
    for line, columns, values in rows:
        loc = f"{path}:{line}"
        if columns is not checked_columns:
            present = _pick_columns(
                columns,
                path if ext != ".jsonl" else loc,
                text_column,
                text_pair_column,
                label_column,
                labels_required,
            )
            if has_label is not None and present != has_label:
                raise ValueError(
                    f"{loc}: key {label_column!r} is {'present' if present else 'missing'} here but "
                    f"{'missing' if present else 'present'} on earlier lines; label every example or none"
                )
            has_label, checked_columns = present, columns
        texts = [None if column is None else _text(values[column], column, loc)
                 for column in (text_column, text_pair_column)]
        label = _raw_label(values[label_column], loc) if has_label else None
        examples.append({"text": texts[0], "text_pair": texts[1], "label": label, "domain": None})
        where.append(loc)
    if not examples:
        raise ValueError(f"{path}: no examples (the file has a header but no data rows)")
    return RawSplit(source=path, examples=examples, where=where)


def read_conll_file(path: str) -> RawSplit:
    """Read a CoNLL column file: ``token ... tag`` per line, blank line between sentences.

    The tag is the LAST whitespace-separated column and must be IOB2 ("O", "B-X", "I-X" where an
    I-X continues a B-X or I-X of the same type). ``-DOCSTART-`` lines are skipped. Every line of
    the file must have the same number of columns (checked, so a damaged line is reported).
    """
    _check_file(path)
    examples, where = [], []
    tokens, tags, start = [], [], None
    n_columns = first_line = None

    def flush():
        if tokens:
            examples.append({"tokens": list(tokens), "tags": list(tags)})
            where.append(f"{path}:{start}")
            tokens.clear()
            tags.clear()

    with open(path, encoding="utf-8") as f:
        for line, text in enumerate(f, start=1):
            parts = text.split()
            if not parts or parts[0] == "-DOCSTART-":
                flush()
                continue
            if n_columns is None:
                n_columns, first_line = len(parts), line
                if n_columns < 2:
                    raise ValueError(
                        f"{path}:{line}: expected 'token ... tag' (at least 2 whitespace-separated "
                        f"columns), found {text.strip()!r}"
                    )
            elif len(parts) != n_columns:
                raise ValueError(
                    f"{path}:{line}: expected {n_columns} whitespace-separated columns "
                    f"(as on line {first_line}), found {len(parts)}: {text.strip()!r}"
                )
            tag = parts[-1]
            if not _IOB2_TAG.fullmatch(tag):
                raise ValueError(
                    f"{path}:{line}: tag {tag!r} is not IOB2; expected 'O', 'B-<type>' or 'I-<type>'"
                )
            if tag.startswith("I-") and (not tags or tags[-1][2:] != tag[2:]):
                previous = tags[-1] if tags else "the sentence start"
                raise ValueError(
                    f"{path}:{line}: tag {tag!r} follows {previous!r}; in IOB2 an entity starts "
                    "with B- (is this file IOB1? convert it to IOB2)"
                )
            if start is None or not tokens:
                start = line
            tokens.append(parts[0])
            tags.append(tag)
    flush()
    if not examples:
        raise ValueError(
            f"{path}: no sentences found; expected 'token ... tag' lines with blank lines between sentences"
        )
    return RawSplit(source=path, examples=examples, where=where)


def read_instruction_file(path: str, *, prompt_column: str = "prompt", response_column: str = "response") -> RawSplit:
    """Read causal-LM instruction data: ``{"prompt": str, "response": str}`` examples from a
    ``.jsonl`` file (or a ``.tsv``/``.csv`` with a header row), columns named by the options."""
    _check_file(path)
    ext = os.path.splitext(path)[1].lower()
    if ext == ".jsonl":
        rows = ((line, keys, obj) for line, keys, obj in _rows_from_jsonl(path))
    elif ext in (".tsv", ".csv"):
        delimiter, quoting = ("\t", csv.QUOTE_NONE) if ext == ".tsv" else (",", csv.QUOTE_MINIMAL)
        rows = ((line, header, dict(zip(header, row))) for line, header, row in _rows_from_table(path, delimiter, quoting))
    else:
        raise ValueError(f"{path}: unknown extension {ext!r}; causal_lm data is .jsonl, .tsv or .csv")
    examples, where = [], []
    for line, columns, row in rows:
        for column in (prompt_column, response_column):
            if column not in columns:
                raise ValueError(f"{path}:{line}: column {column!r} not found; available columns: {columns}")
            if not isinstance(row[column], str) or not row[column].strip():
                raise ValueError(f"{path}:{line}: {column!r} must be a non-empty string, got {row[column]!r}")
        examples.append({"prompt": row[prompt_column], "response": row[response_column]})
        where.append(f"{path}:{line}")
    if not examples:
        raise ValueError(f"{path}: no examples found")
    return RawSplit(source=path, examples=examples, where=where)


def read_split(
    path: str,
    task: str,
    *,
    text_column: str = "sentence",
    text_pair_column: str | None = None,
    label_column: str = "label",
    labels_required: bool = True,
) -> RawSplit:
    """Read one local split for ``task`` (CoNLL for token classification, instruction data for
    causal_lm with ``text_column``/``label_column`` as the prompt/response columns, else by extension)."""
    from kdengine.data import amazon  # noqa: PLC0415 (amazon imports this module)

    if task == "sequence_classification" and amazon.is_amazon_source(path):
        return amazon.read_amazon_split(path)
    if task == "token_classification":
        return read_conll_file(path)
    if task == "causal_lm":
        return read_instruction_file(path, prompt_column=text_column, response_column=label_column)
    return read_classification_file(
        path,
        text_column=text_column,
        text_pair_column=text_pair_column,
        label_column=label_column,
        labels_required=labels_required,
    )


def _hub_column(columns: list[str], wanted: str | None, fallback: str | None, what: str, source: str) -> str:
    for column in (wanted, fallback):
        if column is not None and column in columns:
            return column
    raise ValueError(f"{source}: no {what} column {wanted!r}; available columns: {columns}")


def load_hub_splits(
    dataset_name: str,
    dataset_config_name: str | None,
    task: str,
    *,
    text_column: str = "sentence",
    text_pair_column: str | None = None,
    label_column: str = "label",
) -> dict[str, RawSplit]:
    """Load "train"/"validation"/"test" of a dataset through ``datasets.load_dataset``.

    No network setting is changed here: offline (or with a wrong name) loading fails and is
    reported as a ValueError that tells to pass local files instead. ClassLabel features fix
    the label order (``RawSplit.label_names``); a label of -1 (GLUE test splits) means unlabeled
    and is accepted in the test split only. Token classification reads the ``text_column`` /
    ``label_column`` columns when present, else "tokens" / "ner_tags".
    """
    import datasets

    try:
        loaded = datasets.load_dataset(dataset_name, dataset_config_name)
    except Exception as e:  # any failure of the hub or of the builder: one clear message
        raise ValueError(
            f"dataset {dataset_name!r} (config {dataset_config_name!r}) is not available offline or "
            f"could not be loaded ({type(e).__name__}: {e}); pass train_file=... (and validation_file=..., "
            "test_file=...) to read local files instead"
        ) from e
    if "train" not in loaded:
        raise ValueError(f"dataset {dataset_name!r} has no 'train' split; splits: {list(loaded)}")
    splits = {}
    for split in ("train", "validation", "test"):
        if split not in loaded:
            continue
        data = loaded[split]
        source = f"dataset {dataset_name!r} split {split!r}"
        columns = list(data.column_names)
        if task == "token_classification":
            tok_col = _hub_column(columns, text_column, "tokens", "tokens", source)
            tag_col = _hub_column(columns, label_column, "ner_tags", "tag", source)
            feature = data.features[tag_col]
            names = getattr(getattr(feature, "feature", None), "names", None)
            examples = [
                {
                    "tokens": list(row[tok_col]),
                    "tags": [names[t] if names else _raw_label(t, f"{source}[{i}]") for t in row[tag_col]],
                }
                for i, row in enumerate(data)
            ]
        else:
            labels_required = split != "test"
            _pick_columns(columns, source, text_column, text_pair_column, label_column, labels_required)
            names = getattr(data.features.get(label_column), "names", None)
            examples = []
            for i, row in enumerate(data):
                value = row.get(label_column)
                if value is None or (value == -1 and split == "test"):
                    label = None
                elif names is not None:
                    if not 0 <= value < len(names):
                        raise ValueError(
                            f"{source}[{i}]: label id {value} is outside the ClassLabel names {names}"
                        )
                    label = names[value]
                else:
                    label = _raw_label(value, f"{source}[{i}]")
                if label is None and labels_required:
                    raise ValueError(f"{source}[{i}]: missing label (only the test split may be unlabeled)")
                examples.append(
                    {
                        "text": _text(row[text_column], text_column, f"{source}[{i}]"),
                        "text_pair": _text(row[text_pair_column], text_pair_column, f"{source}[{i}]")
                        if text_pair_column else None,
                        "label": label,
                        "domain": None,
                    }
                )
        if not examples:
            raise ValueError(f"{source}: no examples")
        splits[split] = RawSplit(
            source=source,
            examples=examples,
            where=[f"{source}[{i}]" for i in range(len(examples))],
            label_names=list(names) if names else None,
        )
    return splits


def label_set(train: RawSplit, task: str) -> list[str]:
    """The label names: the source's own order if it has one, else the TRAINING labels sorted.

    Numeric labels ("0", "1", "10", "0.5"; one spelling each, :func:`canonical_label`) sort by
    value, so ids equal the values when they are 0..K-1; other labels sort as strings. Stable for
    a given training file.
    """
    if train.label_names is not None:
        return list(train.label_names)
    key = "tags" if task == "token_classification" else "label"
    seen = set()
    for ex in train.examples:
        seen.update(ex[key] if key == "tags" else [ex[key]])
    seen.discard(None)
    if not seen:
        raise ValueError(f"{train.source}: the training split has no labels")
    if all(_NUMBER.fullmatch(s) for s in seen):
        return sorted(seen, key=Decimal)
    return sorted(seen)


def encode_labels(split: RawSplit, task: str, label_names: list[str]) -> list[dict]:
    """Examples with label ids; a label outside ``label_names`` -> ValueError naming file, line, label."""
    index = {name: i for i, name in enumerate(label_names)}

    def lookup(value: str, where: str) -> int:
        if value not in index:
            raise ValueError(
                f"{where}: label {value!r} does not occur in the training split; known labels: {label_names}"
            )
        return index[value]

    out = []
    for ex, where in zip(split.examples, split.where):
        if task == "token_classification":
            tags = [
                lookup(t, f"{where} (sentence start), token {j} {w!r}")
                for j, (w, t) in enumerate(zip(ex["tokens"], ex["tags"]))
            ]
            out.append({"tokens": ex["tokens"], "tags": tags})
        else:
            label = None if ex["label"] is None else lookup(ex["label"], where)
            out.append({**ex, "label": label})
    return out
