"""Bench 4: the cost of training live: the job runner with a page-like poller against the bare loop.

The same ``baby`` spec trains either by calling ``training.train`` directly (bare) or through
``jobs.LocalJobRunner`` while a second thread reads ``snapshot`` every 0.5 s, as the Train page's
fragment does (and builds the metrics frame, as the page does for its chart). Runs alternate
(bare, live, bare, live ...); each run's tokens/s is its trained tokens over its logged training
time (metrics.csv ``elapsed_s``), and the medians are compared. Both train with the torch threads the
runner gives a lone job (``worker.threads_per_job``: the cores but one, which the server and the page's
polling use), so the two paths differ only in how the run is driven and watched, not in thread count.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
from pathlib import Path

import torch

from bench.common import Report, corpus_source, interval_note, median, threads_env
from tinygpt_core.jobs import LocalJobRunner
from tinygpt_core.limits import cpu_cores
from tinygpt_core.runs import RunStore, read_metrics
from tinygpt_core.training import TrainSpec, train
from tinygpt_core.worker import threads_per_job

POLL_S = 0.5
TARGET = 0.05


def tokens_per_s(run_dir: Path, spec: TrainSpec) -> float:
    m = read_metrics(run_dir)
    steps, elapsed = int(m["step"].iloc[-1]), float(m["elapsed_s"].iloc[-1])
    return steps * spec.train.batch_size * spec.train.grad_accum * spec.model.block_size / elapsed


def make_spec(source: str, iters: int) -> TrainSpec:
    return TrainSpec.from_preset(
        "baby", source, max_iters=iters, eval_interval=max(1, iters // 2), eval_iters=5, sample_tokens=40
    )


def bare_run(store: RunStore, source: str, iters: int, threads: int) -> float:
    spec = make_spec(source, iters)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        result = train(spec, store.create("bare"))
    finally:
        torch.set_num_threads(before)
    return tokens_per_s(result.run_dir, spec)


def live_run(store: RunStore, source: str, iters: int, threads: int) -> tuple[float, int]:
    spec = make_spec(source, iters)
    runner = LocalJobRunner(store=store, max_jobs_per_device=1)
    with threads_env(threads):  # read when the job starts, inside submit
        job = runner.submit(spec)
    polls, done = [0], threading.Event()

    def poller() -> None:  # what an open Train page does
        while not done.is_set():
            snap = runner.snapshot(job)
            snap.metrics_frame()
            polls[0] += 1
            if snap.finished:
                return
            done.wait(POLL_S)

    t = threading.Thread(target=poller, daemon=True)
    t.start()
    snap = runner.wait(job, poll_s=POLL_S)
    done.set()
    t.join()
    runner.shutdown()
    if snap.status != "done":
        raise RuntimeError(f"live run ended {snap.status}: {snap.message}")
    return tokens_per_s(snap.run_dir, spec), polls[0]


def run(quick: bool = False, results=None, iters: int = 400, repeats: int = 3) -> dict:
    source = corpus_source()
    iters, repeats = (30, 1) if quick else (iters, repeats)
    bare, live, polls = [], [], []
    threads = threads_per_job(1)
    with tempfile.TemporaryDirectory(prefix="tinygpt-bench-") as tmp:
        store = RunStore(tmp)
        for _ in range(repeats):
            bare.append(bare_run(store, source, iters, threads))
            tps, n = live_run(store, source, iters, threads)
            live.append(tps)
            polls.append(n)
    overhead = 1 - median(live) / median(bare)
    report = Report("4. Live overhead: job runner + poller every 0.5 s vs the bare loop", quick=quick)
    report.add(
        f"`baby` preset, {iters} steps per run, runs alternating bare/live, {repeats} of each, "
        f"{threads} torch thread(s) in both (the runner's choice for a lone job on {cpu_cores()} cores); "
        f"tokens/s = trained tokens / logged training seconds (evals included in both)."
    )
    report.add_table(
        ["path", "tokens/s (median)", "runs", "polls per run"],
        [
            ["bare training.train", f"{median(bare):,.0f}", "/".join(f"{x:,.0f}" for x in bare), "–"],
            [
                "LocalJobRunner + poller",
                f"{median(live):,.0f}",
                "/".join(f"{x:,.0f}" for x in live),
                "/".join(str(p) for p in polls),
            ],
        ],
    )
    report.add(f"Overhead: {100 * overhead:.1f}% (target < {100 * TARGET:.0f}%); {interval_note(bare, live)}.")
    report.emit(results)
    return dict(bare=bare, live=live, overhead=overhead)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one 30-step run of each: checks the script")
    ap.add_argument("--iters", type=int, default=400, help="steps per run")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each path")
    args = ap.parse_args(argv)
    run(args.quick, iters=args.iters, repeats=args.repeats)


if __name__ == "__main__":
    main()
