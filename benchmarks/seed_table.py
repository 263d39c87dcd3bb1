"""Mean ± std over seeds of finished ``kdengine.train`` runs, as a markdown table.

    python -m benchmarks.seed_table RUN_DIR [RUN_DIR ...] [--domains]

Each ``RUN_DIR`` is the ``output_dir`` of one run of the same command with another ``--seed``. Rows
are the models of its ``comparison.json`` (teachers, method stages' rows, the students), in the order
of the first run; columns the run's metric per seed, its mean ± sample standard deviation, and the
mean training time. With ``--domains`` (Meta-KD) the columns are the per-domain accuracies of
``domain_results.json`` instead, each as mean ± std.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics


def _read(run_dir: str, name: str) -> dict:
    path = os.path.join(run_dir, name)
    if not os.path.isfile(path):
        raise SystemExit(f"seed_table: {path} is missing; is {run_dir} a finished kdengine.train output_dir?")
    with open(path) as fh:
        return json.load(fh)


def _seed(run_dir: str) -> str:
    import yaml  # noqa: PLC0415

    with open(os.path.join(run_dir, "config.yaml")) as fh:
        return str(yaml.safe_load(fh).get("seed", "?"))


def mean_std(values: list[float]) -> str:
    """``mean ± std`` (sample std; ``mean`` alone for one value), four decimals."""
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def comparison_table(run_dirs: list[str]) -> str:
    """One row per model of ``comparison.json``: each seed's metric, mean ± std, mean train time."""
    runs = [_read(d, "comparison.json") for d in run_dirs]
    metric = runs[0]["metric"]
    by_run = [{row["model"]: row for row in run["rows"]} for run in runs]
    lines = [f"| model | {' | '.join(f'seed {_seed(d)}' for d in run_dirs)} | {metric} mean ± std "
             f"| train time (s), mean |", "|---" * (len(runs) + 3) + "|"]
    for model in by_run[0]:
        rows = [r.get(model) for r in by_run]
        values = [r[metric] for r in rows if r is not None and r.get(metric) is not None]
        times = [r["train_time_s"] for r in rows if r is not None and r.get("train_time_s") is not None]
        cells = [f"{r[metric]:.4f}" if r is not None and r.get(metric) is not None else "—" for r in rows]
        time = f"{statistics.mean(times):.0f}" if times else "—"
        lines.append(f"| {model} | {' | '.join(cells)} | {mean_std(values) if values else '—'} | {time} |")
    return "\n".join(lines)


def domain_table(run_dirs: list[str]) -> str:
    """One row per model of ``domain_results.json``, one column per domain and overall, mean ± std."""
    runs = [_read(d, "domain_results.json")["rows"] for d in run_dirs]
    columns = [k for k in next(iter(runs[0].values())) if k.endswith("_accuracy")]
    names = [c[len("eval_"):-len("_accuracy")] or "all" for c in columns]
    names = ["all" if c == "eval_accuracy" else n for c, n in zip(columns, names)]
    lines = [f"| model | {' | '.join(names)} |", "|---" * (len(columns) + 1) + "|"]
    for model in runs[0]:
        cells = [mean_std([run[model][c] for run in runs if model in run]) for c in columns]
        lines.append(f"| {model} | {' | '.join(cells)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+")
    parser.add_argument("--domains", action="store_true", help="per-domain columns from domain_results.json")
    args = parser.parse_args(argv)
    print(domain_table(args.run_dirs) if args.domains else comparison_table(args.run_dirs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
