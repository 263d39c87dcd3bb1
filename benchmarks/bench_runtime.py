"""A trained PEE-KD teacher through :class:`kdengine.runtime.ExpertRuntime.predict`: throughput and
accuracy of each routing, ratios in one run.

    python -m benchmarks.bench_runtime [--model OUTPUT_DIR] [--quick] [--device cpu|cuda] [--rounds R]

Without ``--model`` it first trains the embedded default (``python -m kdengine.train``, PEE-KD with
K = 4 experts) into a temporary directory; ``--quick`` trains a seconds-long tiny run instead (its
numbers mean nothing: tests/test_benchmarks_smoke.py). The inputs are the run's validation split,
rebuilt from its ``config.yaml`` (:func:`kdengine.data.load_task_data`).

Routings (rows): ``fixed:<k>`` (each expert alone), ``all`` (the K-expert ensemble), ``selector``
with ``top_k`` 1 and 2, ``oracle`` with ``top_k`` 1 (needs the labels and runs all K experts to
find the best: an accuracy bound, not a deployable speed). Each row: ``examples_per_s`` (the whole
validation split through ``predict``, ``--batch_size`` inputs per batch, over the median round),
``accuracy``, ``speedup_vs_all`` (the median over rounds of the ``all`` time / this row's time,
measured in the same round) and the experts run per input. Rounds are interleaved (each times every
routing once with :func:`benchmarks._harness.time_ms`), so load from other processes hits every
routing alike; on CUDA the harness times with device synchronisation (``do_bench``). A last row,
``target``, checks the issue's target: selector top-1 ≥ 0.9·K × the ensemble's throughput at
accuracy ≥ the best single expert's.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import yaml

from benchmarks._harness import ResultRows, parse_threaded_args, print_table, time_ms, write_results
from kdengine.data import load_task_data
from kdengine.runtime import ExpertRuntime

QUICK_RUN = dict(synthetic_num_train=96, synthetic_num_validation=32, synthetic_num_test=0,
                 per_device_train_batch_size=16, num_train_epochs=1, teacher_num_train_epochs=1,
                 expert_num_train_epochs=1, selector_num_train_epochs=1, num_virtual_tokens=2,
                 compare_baselines=False, report_to="none", teacher_min_margin=-1)


def train_default(output_dir: str, quick: bool) -> None:
    """The embedded default's PEE-KD run (or the tiny ``QUICK_RUN``) into ``output_dir``."""
    from kdengine.train.__main__ import main  # noqa: PLC0415

    flags = ["--output_dir", output_dir]
    for key, value in (QUICK_RUN if quick else {}).items():
        flags += [f"--{key}", str(value)]
    if main(flags) != 0:
        raise SystemExit(f"training the embedded default into {output_dir} failed")


def validation_inputs(output_dir: str) -> tuple[list, list[str]]:
    """The run's validation split: (texts or (text, text_pair) pairs, label names)."""
    with open(os.path.join(output_dir, "config.yaml")) as fh:
        cfg = yaml.safe_load(fh)
    data = load_task_data({**cfg, "synthetic": {"n_train": cfg["synthetic_num_train"],
                                                "n_validation": cfg["synthetic_num_validation"],
                                                "n_test": cfg["synthetic_num_test"]}})
    if not data.validation:
        raise SystemExit(f"{output_dir}: its run has no validation split to benchmark on")
    inputs = [ex["text"] if ex.get("text_pair") is None else (ex["text"], ex["text_pair"])
              for ex in data.validation]
    return inputs, [data.label_names[ex["label"]] for ex in data.validation]


def routings(k: int) -> list[tuple[str, str, int | None]]:
    """(row name, routing, top_k) of every measured routing of K experts."""
    rows = [(f"expert_{i}", f"fixed:{i}", None) for i in range(k)]
    return rows + [("all", "all", None), ("selector_top1", "selector", 1), ("selector_top2", "selector", 2),
                   ("oracle_top1", "oracle", 1)]


def run(runtime: ExpertRuntime, inputs: list, labels: list[str], *, rounds: int, batch_size: int,
        device: str) -> list[dict]:
    k = runtime.num_experts
    plans = [p for p in routings(k) if p[2] is None or p[2] <= k]
    calls = {name: (lambda r=routing, t=top_k: runtime.predict(
        inputs, routing=r, top_k=t, batch_size=batch_size, labels=labels if r == "oracle" else None))
        for name, routing, top_k in plans}
    accuracy, experts_run = {}, {}
    for name, fn in calls.items():             # one untimed call each: warm-up, and the predictions
        preds = fn()
        accuracy[name] = sum(p.label == y for p, y in zip(preds, labels)) / len(labels)
        experts_run[name] = sum(len(p.experts) for p in preds) / len(preds)
    timing = dict(warmup=0, rep=1) if device == "cpu" else {}
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            times[name].append(time_ms(fn, device=device, **timing)["p50"])
    base = torch.tensor(times["all"], dtype=torch.float64)
    rows = ResultRows("runtime")
    for name, routing, top_k in plans:
        ms = torch.tensor(times[name], dtype=torch.float64)
        rows.append(dict(device=device, routing=name, K=k, top_k=top_k, examples=len(inputs),
                         batch_size=batch_size, threads=torch.get_num_threads(), rounds=rounds,
                         experts_per_input=experts_run[name], ms_p50=round(ms.median().item(), 2),
                         examples_per_s=round(len(inputs) / (ms.median().item() / 1e3), 1),
                         speedup_vs_all=round((base / ms).median().item(), 3), accuracy=accuracy[name]))
    by_name = {r["routing"]: r for r in rows}
    best = max(range(k), key=lambda i: by_name[f"expert_{i}"]["accuracy"])
    top1 = by_name["selector_top1"]
    rows.append(dict(device=device, routing="target", K=k,
                     speedup_vs_all=top1["speedup_vs_all"], speedup_target=round(0.9 * k, 3),
                     accuracy=top1["accuracy"], best_single_expert=best,
                     best_single_expert_accuracy=by_name[f"expert_{best}"]["accuracy"],
                     speed_target_met=top1["speedup_vs_all"] >= 0.9 * k,
                     accuracy_target_met=top1["accuracy"] >= by_name[f"expert_{best}"]["accuracy"]))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a kdengine.train --method pee_kd output directory "
                                                      "(default: train the embedded default first)")
    parser.add_argument("--quick", action="store_true", help="without --model: a tiny training run, 2 rounds "
                                                            "(a smoke run)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5, --quick 2)")
    parser.add_argument("--batch_size", type=int, default=32)
    args = parse_threaded_args(parser, argv)
    rounds = args.rounds or (2 if args.quick else 5)
    with tempfile.TemporaryDirectory(prefix="bench_runtime-") as tmp:
        model = args.model
        if model is None:
            model = os.path.join(tmp, "run")
            train_default(model, args.quick)
        runtime = ExpertRuntime.from_pretrained(model, device=args.device)
        inputs, labels = validation_inputs(model)
        rows = run(runtime, inputs, labels, rounds=rounds, batch_size=args.batch_size, device=args.device)
    print_table(rows, ["routing", "top_k", "experts_per_input", "ms_p50", "examples_per_s", "speedup_vs_all",
                       "accuracy", "speed_target_met", "accuracy_target_met"])
    csv_path, json_path = write_results("runtime" + ("_quick" if args.quick else ""), rows, args.out_dir,
                                        device=args.device)
    print(f"wrote {csv_path} and {json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
