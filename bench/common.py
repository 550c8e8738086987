"""What every benchmark shares: machine facts, matmul peaks, interleaved timing, tables and RESULTS.md.

Each benchmark compares things by running them in turns (A B A B ...) inside one process and
reporting medians, so a neighbour's burst of CPU work lands on both sides instead of on whichever
ran second. Every table printed is also appended to ``bench/RESULTS.md`` under a header that says
when, on what machine, with which torch and how many threads it was measured.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "RESULTS.md"
QUICK_RESULTS = REPO / "bench" / "out" / "RESULTS-quick.md"  # --quick figures are smoke tests, not results
# Tiny Shakespeare lives beside the checkout (../shared/data); it is read there, never copied in.
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"


def corpus_source() -> str:
    """The corpus the benchmarks train on: $BENCH_CORPUS, else Tiny Shakespeare beside the repo, else built in."""
    if os.environ.get("BENCH_CORPUS"):
        return os.environ["BENCH_CORPUS"]
    if SHAKESPEARE.is_file():
        return str(SHAKESPEARE)
    return "builtin:shakespeare"  # a local copy if one was downloaded; DataError says how to get one


# ---------------------------------------------------------------------------------------------
# Machine facts


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    return set()


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def machine_line() -> str:
    """One line for a results header: date, CPU, cores, torch, threads, current load."""
    flags = cpu_flags()
    bf16 = "AMX-bf16" if "amx_bf16" in flags else ("AVX512-bf16" if "avx512_bf16" in flags else "no native bf16")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    load = load_average()
    now = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return (
        f"{now} · {cpu_name()} ({os.cpu_count()} cores, {bf16}) · {gpu} · torch {torch.__version__} · "
        f"{torch.get_num_threads()} threads · load {'?' if load is None else f'{load:.2f}'} (1-min)"
    )


# ---------------------------------------------------------------------------------------------
# Timing


def interleaved(
    fns: dict[str, Callable[[], object]], rounds: int, warmup: int = 1, cpu: dict[str, list[float]] | None = None
) -> dict[str, list[float]]:
    """Seconds per call of each function, measured in turns: A B C A B C ... (after ``warmup`` unmeasured rounds).

    With ``cpu`` (a dict) the process's CPU seconds per call are collected there too."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.perf_counter() - t0)
            if cpu is not None:
                cpu.setdefault(name, []).append(time.process_time() - c0)
    return times


def median(xs: Iterable[float]) -> float:
    return statistics.median(list(xs))


def overhead_interval(base: Sequence[float], other: Sequence[float], level: float = 0.9) -> tuple[float, float]:
    """A bootstrap interval for ``1 - median(other) / median(base)`` (the share of ``base``'s rate lost).

    Runs of one path on a shared machine spread far more than a few-percent effect, so a single ratio
    of medians says little alone: each path's runs are resampled with replacement (seeded, so a table
    is reproducible from its runs), and the central ``level`` of the resampled overheads is returned."""
    rng, n = random.Random(0), 4000
    draws = sorted(
        1 - median(rng.choices(other, k=len(other))) / median(rng.choices(base, k=len(base))) for _ in range(n)
    )
    tail = (1 - level) / 2
    return draws[int(tail * n)], draws[int((1 - tail) * n) - 1]


def interval_note(base: Sequence[float], other: Sequence[float]) -> str:
    """``overhead_interval`` as a report's words, saying when the runs cannot tell the two paths apart."""
    low, high = overhead_interval(base, other)
    verdict = ": the runs cannot tell the two paths apart" if low < 0 < high else ""
    return f"90% bootstrap interval over these runs {100 * low:.1f}% to {100 * high:.1f}%{verdict}"


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 7) -> float:
    """GFLOP/s of an n×n by n×n matrix multiply in ``dtype`` on the CPU (median of ``reps``)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    for _ in range(2):
        a @ b
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        ts.append(time.perf_counter() - t0)
    return 2 * n**3 / median(ts) / 1e9


def matmul_peaks(n: int = 2048, reps: int = 7) -> dict[str, float]:
    """fp32 and bf16 matmul GFLOP/s, the denominators of model FLOPs utilisation (MFU)."""
    return {"fp32": matmul_peak(torch.float32, n, reps), "bf16": matmul_peak(torch.bfloat16, n, reps)}


# ---------------------------------------------------------------------------------------------
# Reporting


def fmt(x: object, digits: int = 1) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        if x != x:  # NaN
            return "–"
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        return f"{x:.{digits}f}"
    return str(x)


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub markdown table (which also reads well in a terminal)."""
    cells = [[str(h) for h in headers]] + [[c if isinstance(c, str) else fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


@dataclass
class Report:
    """One benchmark's section: a title, tables and notes; printed and appended to a results file."""

    title: str
    quick: bool = False
    parts: list[str] = field(default_factory=list)

    def add_table(self, headers: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
        self.parts.append(table(headers, rows))

    def add(self, text: str) -> None:
        self.parts.append(text)

    def text(self) -> str:
        title = self.title + (" (--quick: smoke figures, not results)" if self.quick else "")
        return "\n\n".join([f"## {title}", f"_{machine_line()}_", *self.parts]) + "\n"

    def emit(self, results: Path | None = None) -> Path:
        """Print the section and append it to ``results`` (default: RESULTS.md, or the quick file)."""
        path = Path(results) if results else (QUICK_RESULTS if self.quick else RESULTS)
        body = self.text()
        print("\n" + body, flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        with open(path, "a", encoding="utf-8") as f:
            if new:
                f.write("# Benchmark results\n\nAppended by `python -m bench`; newest sections last.\n\n")
            f.write(body + "\n")
        return path


@contextlib.contextmanager
def threads_env(threads: int | None):
    """TINYGPT_NUM_THREADS set to ``threads`` (None: unset) for the local runner's jobs, restored after."""
    old = os.environ.get("TINYGPT_NUM_THREADS")
    if threads is None:
        os.environ.pop("TINYGPT_NUM_THREADS", None)
    else:
        os.environ["TINYGPT_NUM_THREADS"] = str(threads)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TINYGPT_NUM_THREADS", None)
        else:
            os.environ["TINYGPT_NUM_THREADS"] = old


def quick_main(run: Callable[..., object], doc: str | None, quick_help: str, argv: list[str] | None = None) -> None:
    """The command line of a bench whose ``run(quick, results)`` needs nothing else: --quick and --results."""
    import argparse

    ap = argparse.ArgumentParser(description=(doc or "").splitlines()[0] if doc else None)
    ap.add_argument("--quick", action="store_true", help=quick_help)
    ap.add_argument("--results", type=Path, help="append the tables here instead of bench/RESULTS.md")
    args = ap.parse_args(argv)
    run(args.quick, args.results)
