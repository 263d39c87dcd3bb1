"""Shared benchmark harness: environment record, timing, peak extra memory, result files, tables.

Every benchmark under ``benchmarks/`` uses these five functions, so all results are measured and
stored the same way:

* :func:`env_info`          device name, versions, git commit and a timestamp (stored with results).
* :func:`time_ms`           median / p20 / p80 milliseconds of a call. CUDA: ``triton.testing.do_bench``
                            (CUDA events, L2 flushed between calls); CPU: a ``time.perf_counter`` loop.
* :func:`pct_of_floor`      achieved bandwidth as a percentage of the GPU's measured HBM bandwidth.
* :func:`peak_extra_bytes`  memory a call needs on top of what already exists (its inputs). CUDA:
                            ``torch.cuda.max_memory_allocated`` delta. CPU: resident-set high-water
                            mark delta (see the function; torch CPU tensors are invisible to tracemalloc
                            and torch keeps no CPU peak counter).
* :func:`write_results`     ``<out_dir>/<name>-<device>.csv`` and ``.json`` with :func:`env_info`.
* :class:`ResultRows`       the rows of a benchmark: a list that also appends each row, as soon as
                            it is measured, to the JSON-lines file named by ``KDENGINE_BENCH_ROWS``
                            (benchmarks/gpu_session.sh sets it), so a run cut short by a timeout
                            still leaves every number it measured.
* :func:`print_table`       fixed-width table on stdout.
* :func:`parse_threaded_args` the ``--device`` / ``--threads`` / ``--out-dir`` flags, applied.

Only torch and the standard library are imported here (no data libraries); triton is imported
lazily, when CUDA timing needs it.
"""

from __future__ import annotations

import csv
import ctypes
import ctypes.util
import datetime
import gc
import importlib.metadata
import json
import math
import os
import platform
import re
import subprocess
import time
from collections.abc import Callable, Sequence

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Defaults of time_ms: CUDA values are milliseconds (do_bench), CPU values are call counts.
CUDA_WARMUP_MS, CUDA_REP_MS = 25, 100
CPU_WARMUP_CALLS, CPU_REP_CALLS = 2, 10
# env_info keys repeated as columns of every CSV row, so a CSV is self-describing.
CSV_ENV_KEYS = ("device_name", "torch", "triton", "git_commit")


def _resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def env_info(device=None) -> dict:
    """Where and with what a result was measured.

    Keys: device_type, device_name (GPU name on CUDA, CPU model on CPU), cpu, cpu_count,
    torch_threads, python, torch, cuda (torch's CUDA version or None), triton (installed
    version or None; triton is not imported), kdengine, platform, git_commit, git_dirty,
    timestamp (UTC, ISO 8601).
    """
    dev = _resolve_device(device)
    cuda = dev.type == "cuda"
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return dict(
        device_type=dev.type,
        device_name=torch.cuda.get_device_name(dev) if cuda else _cpu_name(),
        cpu=_cpu_name(),
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        python=platform.python_version(),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        triton=_package_version("triton"),
        kdengine=_package_version("kdengine"),
        platform=platform.platform(),
        git_commit=_git("rev-parse", "HEAD"),
        git_dirty=None if dirty is None else bool(dirty),
        timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )


# Measured HBM bandwidth (device-to-device copy, read + write counted) by GPU name: the denominator
# of "% of the bandwidth floor". ../shared/docs/kernels.md §1: H200 ~4.3 TB/s.
HBM_BYTES_PER_S = {"H200": 4.3e12}


def pct_of_floor(gbps: float, device) -> float | None:
    """Achieved GB/s as a percentage of the device's measured bandwidth (None when unknown, e.g. CPU)."""
    dev = _resolve_device(device)
    if dev.type != "cuda":
        return None
    name = torch.cuda.get_device_name(dev)
    peak = next((bw for key, bw in HBM_BYTES_PER_S.items() if key in name), None)
    return None if peak is None else 100.0 * gbps * 1e9 / peak


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy / torch.quantile default)."""
    pos = q * (len(sorted_values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def time_ms(fn: Callable[[], object], *, warmup: float | None = None, rep: float | None = None,
            grad_to_none: Sequence[torch.Tensor] | None = None, device=None) -> dict:
    """Median, 20th and 80th percentile wall time of ``fn()`` in milliseconds.

    Args:
        fn: zero-argument callable running the workload once (e.g. forward + backward).
        warmup, rep: on CUDA, milliseconds of warm-up and of measurement, as in
            ``triton.testing.do_bench`` (defaults 25 and 100). On CPU, numbers of untimed warm-up
            calls and of timed calls (defaults 2 and 10; at least one timed call).
        grad_to_none: tensors whose ``.grad`` is reset to None before every call (outside the
            timed region), so gradient accumulation does not add a kernel or memory.
        device: where ``fn`` runs; default CUDA when available, else CPU.

    Returns:
        dict(p50=, p20=, p80=) in ms.
    """
    dev = _resolve_device(device)
    if dev.type == "cuda":
        from triton.testing import do_bench  # noqa: PLC0415

        with torch.cuda.device(dev):
            p50, p20, p80 = do_bench(fn, warmup=CUDA_WARMUP_MS if warmup is None else warmup,
                                     rep=CUDA_REP_MS if rep is None else rep,
                                     grad_to_none=grad_to_none, quantiles=[0.5, 0.2, 0.8])
        return dict(p50=p50, p20=p20, p80=p80)

    n_warmup = CPU_WARMUP_CALLS if warmup is None else int(warmup)
    n_rep = max(1, CPU_REP_CALLS if rep is None else int(rep))

    def reset_grads():
        for t in grad_to_none or ():
            t.grad = None

    for _ in range(n_warmup):
        reset_grads()
        fn()
    times = []
    for _ in range(n_rep):
        reset_grads()
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return dict(p50=_quantile(times, 0.5), p20=_quantile(times, 0.2), p80=_quantile(times, 0.8))


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"/proc/self/status has no {key}")


def _malloc_trim() -> None:
    """Hand freed heap pages back to the OS (glibc), so that re-using them counts as new memory."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return
    libc = ctypes.CDLL(libc_name)
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _cpu_peak_extra_bytes(fn: Callable[[], object]) -> int:
    """Resident-set high-water mark during ``fn()`` minus the resident set just before it.

    Linux only: writing "5" to /proc/self/clear_refs resets the high-water mark (VmHWM) to the
    current resident set. Freed heap memory is first trimmed so that ``fn`` re-using it is counted.
    Torch CPU tensors are plain malloc/mmap memory (no caching allocator), so this sees them.
    """
    try:
        gc.collect()
        _malloc_trim()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _proc_status_bytes("VmRSS")
    except OSError as exc:
        raise RuntimeError("CPU peak memory needs Linux /proc/self/clear_refs and /proc/self/status "
                           f"(resident-set high-water mark): {exc}") from exc
    fn()
    return max(0, _proc_status_bytes("VmHWM") - base)


def peak_extra_bytes(fn: Callable[[], object], device, *, warmup: int = 1) -> int:
    """Peak memory ``fn()`` needs on top of what is allocated before it runs, in bytes.

    Build (and, on CPU, touch: e.g. ``torch.randn``, not ``torch.empty``) the inputs before the
    call; whatever ``fn`` allocates, including its outputs and gradients, is counted.

    Args:
        fn: zero-argument callable running the workload once.
        device: the device ``fn`` allocates on (``"cuda"``, ``"cuda:1"``, ``"cpu"``).
        warmup: untimed, unmeasured calls first (compilation, autotuning, lazy initialisation).

    CUDA: ``max_memory_allocated`` after the call minus ``memory_allocated`` before it (peak stats
    reset first). CPU (Linux): the resident-set high-water mark of this process during the call
    minus its resident set just before (see ``_cpu_peak_extra_bytes``); it includes memory torch
    allocates internally (e.g. autograd buffers), at page granularity.
    """
    dev = torch.device(device)
    for _ in range(warmup):
        fn()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        gc.collect()
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        fn()
        torch.cuda.synchronize(dev)
        return max(0, torch.cuda.max_memory_allocated(dev) - base)
    if dev.type == "cpu":
        return _cpu_peak_extra_bytes(fn)
    raise ValueError(f"peak_extra_bytes supports cuda and cpu devices, got {dev}")


def _device_slug(device) -> str:
    dev = _resolve_device(device)
    if dev.type != "cuda":
        return dev.type
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(dev).lower()).strip("-")


def _json_default(value):
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    return str(value)


def _atomic_write(path: str, write: Callable) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        write(f)
    os.replace(tmp, path)


class ResultRows(list):
    """A benchmark's result rows; with ``KDENGINE_BENCH_ROWS`` set, every row appended (``append``,
    ``extend``, ``+=``) is also written at once, flushed, to that JSON-lines file as
    ``{"bench": <bench>, **row}``."""

    def __init__(self, bench: str):
        super().__init__()
        self.bench = bench
        self.path = os.environ.get("KDENGINE_BENCH_ROWS") or None

    def _stream(self, rows) -> None:
        if self.path is None:
            return
        with open(self.path, "a") as f:
            for row in rows:
                f.write(json.dumps({"bench": self.bench, **row}, default=_json_default) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def append(self, row: dict) -> None:
        self._stream([row])
        super().append(row)

    def extend(self, rows) -> None:
        rows = list(rows)
        self._stream(rows)
        super().extend(rows)

    def __iadd__(self, rows):
        self.extend(rows)
        return self


def write_results(name: str, rows: list[dict], out_dir: str = "benchmarks/results", *,
                  device=None) -> tuple[str, str]:
    """Write ``rows`` to ``<out_dir>/<name>-<device>.csv`` and ``.json``; returns both paths.

    ``<device>`` is ``cpu`` or the GPU name in lower case (e.g. ``nvidia-h200``); ``device``
    defaults to CUDA when available. The JSON holds ``{"name", "env": env_info(), "rows"}``; the
    CSV has one line per row (columns: union of the rows' keys, first-seen order) plus the
    env_info columns ``env_device_name, env_torch, env_triton, env_git_commit``. A relative
    ``out_dir`` is relative to the current directory.
    """
    env = env_info(device)
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"{name}-{_device_slug(device)}")
    csv_path, json_path = stem + ".csv", stem + ".json"
    columns = list(dict.fromkeys(key for row in rows for key in row))
    columns += [f"env_{key}" for key in CSV_ENV_KEYS]
    env_cols = {f"env_{key}": env[key] for key in CSV_ENV_KEYS}

    def write_csv(f):
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({**{k: _json_default(v) if isinstance(v, torch.dtype) else v
                                for k, v in row.items()}, **env_cols})

    def write_json(f):
        json.dump(dict(name=name, env=env, rows=rows), f, indent=1, default=_json_default)
        f.write("\n")

    _atomic_write(csv_path, write_csv)
    _atomic_write(json_path, write_json)
    return csv_path, json_path


def _format_cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3e}"
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"
    if isinstance(value, torch.dtype):
        return _json_default(value)
    return str(value)


def print_table(rows: list[dict], columns: Sequence[str], *, title: str | None = None) -> None:
    """Print ``rows`` as a fixed-width table of ``columns`` (missing values show as ``-``)."""
    cells = [[_format_cell(row.get(col)) for col in columns] for row in rows]
    widths = [max([len(col)] + [len(r[i]) for r in cells]) for i, col in enumerate(columns)]
    if title:
        print(title)
    print("  ".join(col.rjust(w) for col, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))


def loss_bench_args(doc: str, parse_size: Callable[[str], tuple], size_help: str, providers: Sequence[str],
                    argv=None):
    """The command line shared by the loss benchmarks: --sizes, --providers, --device, --quick, --out-dir."""
    import argparse  # noqa: PLC0415

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=parse_size, help=f"{size_help} (default depends on the device)")
    parser.add_argument("--providers", nargs="+", choices=providers, default=list(providers))
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, few repetitions, no torch.compile")
    parser.add_argument("--out-dir", default="benchmarks/results")
    return parser.parse_args(argv)


def parse_threaded_args(parser, argv=None):
    """Add ``--device``, ``--threads`` (CPU, default 1: stable ratios on a shared machine) and
    ``--out-dir`` to ``parser``, parse ``argv``, refuse ``--device cuda`` without CUDA and set the CPU
    threads; returns the parsed arguments."""
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (default 1: stable ratios on a shared machine)")
    parser.add_argument("--out-dir", default="benchmarks/results")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    return args


def run_providers(bench: str, names: Sequence[str], provider_fn: Callable, sizes: Sequence[tuple],
                  measure_one: Callable, device: str, quick: bool) -> tuple[list[dict], list[dict]]:
    """Measure every provider at every size; returns (rows, skipped rows with the reason), both
    :class:`ResultRows` of ``bench`` (streamed as measured).

    ``provider_fn(name, device, quick) -> (loss_fn | None, reason)``;
    ``measure_one(name, loss_fn, size) -> list[dict]``.
    """
    rows, skipped = ResultRows(bench), ResultRows(bench)
    for name in names:
        loss_fn, reason = provider_fn(name, device, quick)
        if loss_fn is None:
            skipped.append(dict(provider=name, status=f"skipped: {reason}"))
            continue
        for size in sizes:
            rows += measure_one(name, loss_fn, size)
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows, skipped
