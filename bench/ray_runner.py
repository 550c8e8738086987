"""Bench 7: the Ray runner against the local runner, side by side in one run.

The same shortened ``baby`` spec (150 steps by default) trains through ``LocalJobRunner`` (its default
execution: a new child process per job, no warm child) and through ``RayJobRunner`` (a Ray actor on a
local Ray instance started here, or the cluster at $RAY_ADDRESS), in turns: local, ray, local, ray …
Both train with the same number of torch threads (the Ray job asks for that many CPUs). Reported:
tokens/s (trained tokens over logged training seconds, from the run's metrics.csv as written in this
machine's store: for Ray, as shipped back) and seconds from ``submit`` to the first logged step as the
app sees it (``state(job).step >= 1``):

- through the app's runner, which keeps one warm spare actor (the job takes it): the warm-cluster
  figure, target < 3 s. Each timed run waits first until the pool has a warm spare again, so the
  spare's warm-up never overlaps a timed run;
- through a runner with no spares (``spares=0``, a fresh actor per job, as the CLI does): the cost
  the spare saves, measured in the same turns with a short job;
- the first job on a fresh cluster (cold: it takes the spare while that is still warming up).

Target: Ray overhead < 10% in tokens/s. Tiny runs sharing one GPU (1, 4 and 16 at once, aggregate
tokens/s) are measured by ``bench.gpu`` on a machine with a GPU.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from bench.common import Report, corpus_source, interval_note, median
from tinygpt_core.jobs import LocalJobRunner
from tinygpt_core.runs import RunStore, read_metrics
from tinygpt_core.training import TrainSpec

TARGET_OVERHEAD = 0.10
TARGET_FIRST_STEP_S = 3.0


def make_spec(source: str, iters: int) -> TrainSpec:
    return TrainSpec.from_preset(
        "baby", source, max_iters=iters, eval_interval=max(1, iters // 3), eval_iters=5, sample_tokens=40, device="cpu"
    )


def tokens_per_s(run_dir, spec: TrainSpec) -> float:
    m = read_metrics(run_dir)
    steps, elapsed = int(m["step"].iloc[-1]), float(m["elapsed_s"].iloc[-1])
    return steps * spec.train.batch_size * spec.train.grad_accum * spec.model.block_size / elapsed


def timed(runner, spec: TrainSpec) -> tuple[float, float, float]:
    """(tokens/s, seconds from submit to the first logged step, seconds from submit to the end)."""
    t0 = time.perf_counter()
    job = runner.submit(spec)
    first = None
    while True:
        snap = runner.state(job)
        if first is None and snap.step >= 1:
            first = time.perf_counter() - t0
        if snap.finished:
            break
        time.sleep(0.01)
    total = time.perf_counter() - t0
    if snap.status != "done":
        raise RuntimeError(f"{type(runner).__name__} run ended {snap.status}: {snap.message}")
    return tokens_per_s(snap.run_dir, spec), first or total, total


def wait_for_spare(runner, timeout: float = 180.0) -> float:
    """Seconds until ``runner`` has a warm spare (RuntimeError past ``timeout``)."""
    t0 = time.perf_counter()
    while runner.spares_ready() < 1:
        if time.perf_counter() - t0 > timeout:
            raise RuntimeError(f"no warm spare Ray worker within {timeout:.0f} s")
        time.sleep(0.05)
    return time.perf_counter() - t0


def run(quick: bool = False, results=None, iters: int = 150, repeats: int = 3) -> dict:
    from tinygpt_core.ray_runner import RayJobRunner, connect

    source = corpus_source()
    iters, repeats = (20, 1) if quick else (iters, repeats)
    short = max(10, iters // 10)
    threads = torch.get_num_threads()
    t0 = time.perf_counter()
    where = connect(os.environ.get("RAY_ADDRESS") or "local")
    connect_s = time.perf_counter() - t0
    import ray

    # A warm spare is kept only with room for one more job besides it: on a small cluster (2 CPUs, CI's
    # local head) both paths train on fewer threads rather than measure no spare at all.
    fit = max(1, int(ray.cluster_resources().get("CPU", 1) // 2))
    if threads > fit:
        print(f"[ray bench] {threads} torch threads do not leave room for a warm spare here; using {fit}.")
        threads = fit
        torch.set_num_threads(threads)
    local_tps, ray_tps, ray_first, fresh_first, local_first = [], [], [], [], []
    with tempfile.TemporaryDirectory(prefix="tinygpt-bench-ray-") as tmp:
        store = RunStore(tmp)
        local = LocalJobRunner(store=store, max_jobs_per_device=1)
        remote = RayJobRunner(store, cpus_per_job=threads, gpus_per_job=0, reattach=False, spares=1)
        fresh = RayJobRunner(store, cpus_per_job=threads, gpus_per_job=0, reattach=False, spares=0)
        if remote.cluster_cpus < 2 * threads:
            remote.shutdown()
            fresh.shutdown()
            raise SystemExit(
                f"The cluster has {remote.cluster_cpus:g} CPUs: a warm spare of {threads} CPUs is only kept with "
                f"room for one more job besides it ({2 * threads} CPUs). "
                f"Pass --threads {int(remote.cluster_cpus // 2) or 1}."
            )
        try:
            # The first Ray job on a fresh cluster takes the spare while it is still warming up: cold.
            _, cold_first, cold_total = timed(remote, make_spec(source, short))
            # Its replacement starts as the cold job ends (on 2 CPUs there is room for it only then).
            first_spare_s = wait_for_spare(remote)
            for _ in range(repeats):
                wait_for_spare(remote)
                tps, first, _ = timed(local, make_spec(source, iters))
                local_tps.append(tps)
                local_first.append(first)
                wait_for_spare(remote)
                tps, first, _ = timed(remote, make_spec(source, iters))
                ray_tps.append(tps)
                ray_first.append(first)
                wait_for_spare(remote)  # idle and warm: the fresh actor competes with no warm-up
                fresh_first.append(timed(fresh, make_spec(source, short))[1])
        finally:
            local.shutdown()
            remote.shutdown()
            fresh.shutdown()
    overhead = 1 - median(ray_tps) / median(local_tps)
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: None)()
    runs = lambda xs, f: "/".join(f.format(x) for x in xs)  # noqa: E731
    report = Report("7. Ray runner vs local runner (`baby`, shortened)", quick=quick)
    report.add(
        f"`baby` preset on {source}, {iters} steps per run (eval every {max(1, iters // 3)}), {repeats} runs of "
        f"each path alternating local/ray, {threads} torch threads in both (the Ray job asks for {threads} CPUs); "
        f"Ray {__import__('ray').__version__} at {where} (connect {connect_s:.1f} s); AMX tiles: {amx}. "
        "tokens/s = trained tokens / logged training seconds, read from the run folder in this machine's store. "
        f"The fresh-actor row times a {short}-step job (submit to first step only)."
    )
    report.add_table(
        ["path", "tokens/s (median)", "runs", "submit → first step (s, median)"],
        [
            [
                "LocalJobRunner (a new child process per job)",
                f"{median(local_tps):,.0f}",
                runs(local_tps, "{:,.0f}"),
                f"{median(local_first):.2f}",
            ],
            [
                "RayJobRunner, warm spare actor (the app's)",
                f"{median(ray_tps):,.0f}",
                runs(ray_tps, "{:,.0f}"),
                f"{median(ray_first):.2f} ({runs(ray_first, '{:.2f}')})",
            ],
            [
                "RayJobRunner, fresh actor per job (spares=0)",
                "–",
                "–",
                f"{median(fresh_first):.2f} ({runs(fresh_first, '{:.2f}')})",
            ],
        ],
    )
    report.add(
        f"Ray overhead in tokens/s: {100 * overhead:.1f}% (target < {100 * TARGET_OVERHEAD:.0f}%; "
        f"{interval_note(local_tps, ray_tps)}). "
        f"Submit → first logged step on a warm cluster: {median(ray_first):.2f} s with a warm spare "
        f"(target < {TARGET_FIRST_STEP_S:.0f} s), {median(fresh_first):.2f} s with a fresh actor; "
        f"the cold first job: {cold_first:.2f} s to its first step, {cold_total:.2f} s in all. "
        f"A new spare was warm {first_spare_s:.1f} s after the cold job ended (worker start, imports, warm-up)."
    )
    report.emit(results)
    return dict(
        local=local_tps, ray=ray_tps, overhead=overhead, first=ray_first, fresh_first=fresh_first, cold_first=cold_first
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one 20-step run of each: checks the script")
    ap.add_argument("--iters", type=int, default=150, help="steps per run")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each path")
    ap.add_argument("--threads", type=int, help="torch threads for both paths (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    run(args.quick, iters=args.iters, repeats=args.repeats)


if __name__ == "__main__":
    main()
