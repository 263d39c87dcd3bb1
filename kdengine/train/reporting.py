"""What a run reports: metrics.jsonl (+ TensorBoard through accelerate), result JSONs, the table.

Keys follow transformers: ``loss``, ``learning_rate``, ``eval_<metric>``, ``train_runtime``,
``{split}_results.json``. Everything here runs on the main process only.
"""

from __future__ import annotations

import json
import os

from kdengine.atomic import read_json, write_json


# causal_lm: further columns of the table where a row has them (next-token accuracy, ROUGE-L).
GENERATION_COLUMNS = ("eval_accuracy", "eval_rougeL", "eval_rougeL_std")


class MetricsLog:
    """Appends one JSON object per logging event to ``metrics.jsonl`` and mirrors the scalars to the
    accelerate trackers (TensorBoard)."""

    def __init__(self, accelerator, directory: str):
        self.accelerator = accelerator
        self.path = os.path.join(directory, "metrics.jsonl")

    def rewrite(self, history: list[dict]) -> None:
        """Start the file from ``history`` (a resumed run drops events logged after its checkpoint)."""
        if not self.accelerator.is_main_process:
            return
        with open(self.path, "w", encoding="utf-8") as fh:
            for row in history:
                fh.write(json.dumps(row) + "\n")

    def log(self, row: dict) -> None:
        if not self.accelerator.is_main_process:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        scalars = {k: v for k, v in row.items() if k not in ("step", "epoch") and isinstance(v, (int, float))}
        self.accelerator.log(scalars, step=row["step"])


def write_results(directory: str, name: str, values: dict) -> str:
    """``<directory>/<name>_results.json`` (atomic)."""
    path = os.path.join(directory, f"{name}_results.json")
    write_json(path, values)
    return path


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A plain aligned text table (floats with 4 decimals, missing cells as '-')."""
    def cell(value) -> str:
        if value is None:
            return "-"
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    body = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in body)) if body else len(c) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths))
    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line, rule] + ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in body])


def comparison_rows(teacher_results: dict, students: dict[str, dict], metric: str, extra=()) -> list[dict]:
    """Rows of the printed table: teachers first, then students.

    Args:
        teacher_results: {row_name: {metric: value}} (teacher_results.json).
        students: {method: {"eval": eval_results, "train": train_results}} in display order.
        metric: the eval metric without prefix (accuracy, f1).
        extra: further eval keys shown where a row has them (causal_lm: ``GENERATION_COLUMNS``).
    """
    rows = []
    for name, values in teacher_results.items():
        rows.append({"model": name, "role": "teacher", f"eval_{metric}": _metric(values, metric),
                     "eval_loss": values.get("eval_loss"), **_present(values, extra),
                     "train_time_s": values.get("train_runtime")})
    for name, result in students.items():
        rows.append({"model": name, "role": "student", f"eval_{metric}": _metric(result["eval"], metric),
                     "eval_loss": result["eval"].get("eval_loss"), **_present(result["eval"], extra),
                     "train_time_s": result["train"].get("train_runtime")})
    return rows


def _present(values: dict, keys) -> dict:
    return {k: values[k] for k in keys if values.get(k) is not None}


def _metric(values: dict, metric: str):
    value = values.get(f"eval_{metric}", values.get(metric))
    return float(value) if isinstance(value, (int, float)) else value


def finish_comparison(cfg, teacher_results: dict, students: dict[str, dict], log=print) -> dict:
    """Print the table (teachers, then the students in run order) and write output_dir/comparison.json.

    Teacher rows: the task-trained teachers ``teacher_results`` ({name: eval results}) and the rows
    of the main method's teacher_results.json (e.g. PEE-KD's experts and their fusion).
    """
    metric = cfg.best_metric_name()
    teachers = dict(teacher_results)
    main_report = read_json(os.path.join(cfg.output_dir, "teacher_results.json")) or {}
    teachers.update({k: v for k, v in main_report.items() if k not in teachers and isinstance(v, dict)})
    rows = comparison_rows(teachers, students, metric, GENERATION_COLUMNS if cfg.task == "causal_lm" else ())
    shown = [c for c in GENERATION_COLUMNS if any(c in row for row in rows)]
    columns = list(dict.fromkeys(["model", "role", f"eval_{metric}", "eval_loss", *shown, "train_time_s"]))
    log("\n" + format_table(rows, columns) + "\n")
    comparison = {"metric": f"eval_{metric}", "main_method": cfg.method, "rows": rows}
    write_json(os.path.join(cfg.output_dir, "comparison.json"), comparison)
    return comparison
