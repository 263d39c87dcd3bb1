"""Offline teacher cache: distilling from the cache against distilling from the live teacher, and
``sparse_kd_loss`` against ``kd_loss``.

    OMP_NUM_THREADS=1 python -m benchmarks.bench_teacher_cache [--seeds 42,43,44] [--epochs 2]
                                                             [--parts classification,causal_lm,op]

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
* ``op``: ``sparse_kd_loss`` (torch backend, k=32) against ``kd_loss`` (torch backend) forward +
  backward on the same student logits, and the loss difference on a trained teacher's rows.

Results: ``benchmarks/results/teacher_cache-<device>.json`` / ``.csv``.
"""

from __future__ import annotations

import argparse
import json
import os
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
    for method in ("vanilla_kd", "pee_kd"):
        mine = [r for r in rows if r["method"] == method]
        summary = {"part": "classification summary", "method": method, "seeds": len(mine),
                   "speedup_mean": statistics.mean(r["speedup"] for r in mine),
                   "live_accuracy_mean": statistics.mean(r["live_accuracy"] for r in mine),
                   "cached_accuracy_mean": statistics.mean(r["cached_accuracy"] for r in mine),
                   "max_abs_accuracy_diff": max(abs(r["live_accuracy"] - r["cached_accuracy"]) for r in mine)}
        print(json.dumps(summary), flush=True)
        rows.append(summary)
    return rows


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
    parser.add_argument("--parts", default="classification,causal_lm,op")
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
    from benchmarks._harness import write_results  # noqa: PLC0415

    print(write_results("teacher_cache", rows, device="cpu"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
