"""Predict a file with a trained PEE-KD teacher (:class:`kdengine.runtime.ExpertRuntime`).

    python -m kdengine.infer --model OUTPUT_DIR --input FILE.{jsonl,tsv,csv} --output PREDS.jsonl [--top_k 1]

The input is read like a training file (:func:`kdengine.data.readers.read_classification_file`):
the text column (and pair column) of the run's config.yaml unless given, "sentence" by default;
a label column is optional (needed by ``--routing oracle``, and then accuracy is printed). Each
output line is one input, in input order: ``text`` (``text_pair``), ``label``, ``probabilities``
(by ``labels``, the label names), ``experts``, ``weights``. Exit codes: 0 done, 2 bad input or
model directory (one line on stderr, nothing written).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import yaml
from tqdm import tqdm

from kdengine.data.readers import read_classification_file
from kdengine.runtime import ROUTINGS, ExpertRuntime


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m kdengine.infer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a kdengine.train --method pee_kd output directory")
    parser.add_argument("--input", required=True, help="a .jsonl, .tsv or .csv file with a header / keys")
    parser.add_argument("--output", required=True, help="predictions, one JSON object per line")
    parser.add_argument("--top_k", type=int, default=None, help="experts per input (routing selector/oracle; "
                                                                "default 1)")
    parser.add_argument("--routing", default="selector", help=f"one of {', '.join(ROUTINGS)}")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--text_column", default=None, help="default: the run's text_column, else 'sentence'")
    parser.add_argument("--text_pair_column", default=None, help="default: the run's text_pair_column")
    parser.add_argument("--label_column", default=None, help="default: the run's label_column, else 'label'")
    parser.add_argument("--device", default="cpu")
    return parser.parse_args(argv)


def _columns(args) -> dict:
    path = os.path.join(args.model, "config.yaml")
    run = {}
    if os.path.isfile(path):
        with open(path) as fh:
            run = yaml.safe_load(fh) or {}
    return {"text_column": args.text_column or run.get("text_column") or "sentence",
            "text_pair_column": args.text_pair_column or run.get("text_pair_column"),
            "label_column": args.label_column or run.get("label_column") or "label"}


def run(args) -> dict:
    """Predict ``args.input`` into ``args.output``; returns a summary (count, accuracy when labelled)."""
    split = read_classification_file(args.input, labels_required=False, **_columns(args))
    examples = split.examples
    runtime = ExpertRuntime.from_pretrained(args.model, device=args.device)
    inputs = [ex["text"] if ex["text_pair"] is None else (ex["text"], ex["text_pair"]) for ex in examples]
    labels = [ex["label"] for ex in examples]
    labelled = labels[0] is not None
    with tqdm(total=len(inputs), desc="infer", unit="ex") as bar:
        preds = runtime.predict(inputs, top_k=args.top_k, routing=args.routing, batch_size=args.batch_size,
                                labels=labels if labelled else None, progress=bar.update)
    lines = []
    for ex, pred in zip(examples, preds):
        row = {"text": ex["text"], **({"text_pair": ex["text_pair"]} if ex["text_pair"] is not None else {}),
               "label": pred.label, "probabilities": pred.probabilities, "labels": runtime.label_names,
               "experts": pred.experts, "weights": pred.weights}
        lines.append(json.dumps(row) + "\n")
    tmp = f"{args.output}.tmp"
    with open(tmp, "w") as fh:
        fh.writelines(lines)
    os.replace(tmp, args.output)
    summary = {"examples": len(preds)}
    if labelled:
        summary["accuracy"] = sum(p.label == y for p, y in zip(preds, labels)) / len(preds)
    return summary


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        summary = run(args)
    except ValueError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
