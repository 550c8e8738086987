"""Bench: an ablation grid run one member after another against members running side by side.

A grid is what the Runs page's "Launch grid" queues (``state.launch_grid``): the baseline plus one run
per ablation, each trained by the local job runner in its own process, exactly as the app does it.
The hope behind running members side by side: a tiny model's step is many small kernels, too small to
share out well over threads, while a second run in its own process uses a second core fully. How much a
second thread still helps one member decides what side by side can gain (on the 2-core machine of
bench/RESULTS.md, 1.36–1.42× for a `baby-fast` member's step, so at best 0.68–0.71×, and less still once
both cores train at once: ``core_bound``). This bench measures the choice
side by side in one process:

* **one after another**: the runner allows 1 job at a time (``max_jobs_per_device=1``), each with
  the given threads (``seq-T``: T torch threads each). The reference is ``seq-<cores>``, each member
  with every core, the fastest way to run them one after another (a lone job in the app gets one
  core fewer, ``seq-<cores - 1>``, which would flatter side by side). ``seq-1`` runs too: its time
  divided over the cores is side by side with nothing lost to sharing, the floor on whole members;
* **k at once**: the runner allows k jobs at a time with the given threads each (``par-kxT``);
* **auto**: the runner's own default for this machine (what the app and the CLI's ``grid`` get).

The other way to share a machine among members, batching them into one model, is bounded by a second
table (``batching_bound``): one forward and backward of every member one after another, of the
members stacked into one model (``torch.func.vmap`` over their stacked weights), and of one model on
a batch members times larger, which is the least any batching of same-shape members can cost (the
same kernels on more rows, with one set of weights to read). If that is not well under one after
another, batched members cannot reach what processes side by side do not.

Modes run in turns, mirrored (A B B A ...), so a neighbour's burst of work lands on every mode; the
1-minute load is recorded before and after each round. Wall seconds are from the submission of the
grid to the end of its last member (process starts, evals and checkpoints included). CPU seconds
are the children's user + system time: on a busy shared machine more processes take a larger share
of the CPUs than one does, so compare those too before reading a ratio as a speed-up.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import multiprocessing
import resource
import tempfile
import time
import warnings
from pathlib import Path

import torch

from bench.common import Report, corpus_source, fmt, interleaved, load_average, median, threads_env
from tinygpt_core import state
from tinygpt_core.config import get_preset
from tinygpt_core.device import autocast, resolve_precision
from tinygpt_core.jobs import LocalJobRunner
from tinygpt_core.limits import cpu_cores
from tinygpt_core.model import GPT
from tinygpt_core.runs import RunStore
from tinygpt_core.training import TrainSpec
from tinygpt_core.worker import grid_plan

# Five ablations that keep the step's cost about the baseline's, so members take about as long each.
ABLATIONS = ("relu", "no-bias", "qk-norm", "untied", "swap-qk")
# The first is the reference, each member on every core; seq-1 ÷ cores is side by side with nothing lost to sharing.
DEFAULT_MODES = (f"seq-{cpu_cores()}", "seq-1", "auto") if cpu_cores() > 1 else ("seq-1", "auto")


def parse_mode(mode: str) -> tuple[int | None, int | None]:
    """``seq-T`` -> (1, T); ``par-KxT`` -> (K, T); ``auto`` -> (None, None): the runner's defaults."""
    if mode == "auto":
        return None, None
    if mode.startswith("seq-"):
        return 1, int(mode[4:])
    if mode.startswith("par-") and "x" in mode:
        k, t = mode[4:].split("x", 1)
        return int(k), int(t)
    raise ValueError(f"unknown mode {mode!r}: use seq-T, par-KxT or auto")


def _children_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_grid(base: TrainSpec, ablations: tuple[str, ...], mode: str, root: Path) -> dict:
    """Launch one grid through a fresh local runner in ``mode``; wall and CPU seconds until all members end."""
    slots, threads = parse_mode(mode)
    with threads_env(threads):
        runner = LocalJobRunner(RunStore(root / mode), max_jobs_per_device=slots, execution="process")
        try:
            cpu0, t0 = _children_cpu_s(), time.perf_counter()
            launch = state.launch_grid(runner, base, list(ablations))
            snaps = [runner.wait(j) for j in launch.job_ids]
            wall = time.perf_counter() - t0
            cpu = _children_cpu_s() - cpu0
        finally:
            runner.shutdown()
    bad = [s for s in snaps if s.status != "done"]
    if bad:
        raise RuntimeError(f"grid member {bad[0].name} ended {bad[0].status}: {bad[0].message}")
    return dict(
        mode=mode,
        slots=runner.max_jobs_per_device,
        wall_s=wall,
        cpu_s=cpu,
        vals=[s.best_val_loss for s in snaps],
    )


def batching_bound(preset: str, members: int, rounds: int, vocab_size: int = 65) -> tuple[dict[str, float], str]:
    """Median seconds of one forward + backward of ``members`` models of ``preset``, three ways (module docstring).

    Random tokens (the cost of a step does not depend on them), the preset's batch and context, the
    precision ``auto`` picks on this CPU, every core. Returns the medians and that precision."""
    from torch.func import functional_call, stack_module_state, vmap

    spec = get_preset(preset)
    cfg, batch = spec.model_config(vocab_size=vocab_size), spec.train_config().batch_size
    cpu = torch.device("cpu")
    precision = resolve_precision("auto", cpu)
    torch.manual_seed(0)
    models = [GPT(cfg) for _ in range(members)]
    x = torch.randint(0, vocab_size, (members, batch, cfg.block_size))
    y = torch.randint(0, vocab_size, (members, batch, cfg.block_size))
    params, buffers = stack_module_state(models)
    template = copy.deepcopy(models[0])

    def member_loss(p, b, xi, yi):
        return functional_call(template, (p, b), (xi, yi)).loss

    stacked_loss = vmap(member_loss)

    def one_after_another():
        for m, xi, yi in zip(models, x, y):
            with autocast(cpu, precision):
                loss = m(xi, yi).loss
            loss.backward()
            m.zero_grad(set_to_none=True)

    def stacked():
        with autocast(cpu, precision), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # vmap's note that CPU flash attention has no batching rule
            loss = stacked_loss(params, buffers, x, y).sum()
        loss.backward()
        for p in params.values():
            p.grad = None

    def one_big_batch():
        with autocast(cpu, precision):
            loss = models[0](x.flatten(0, 1), y.flatten(0, 1)).loss
        loss.backward()
        models[0].zero_grad(set_to_none=True)

    fns = {
        "one after another": one_after_another,
        "stacked into one model (vmap)": stacked,
        f"one model, batch × {members} (the floor)": one_big_batch,
    }
    return {k: median(v) for k, v in interleaved(fns, rounds=rounds, warmup=1).items()}, precision


def _member_step(preset: str, vocab_size: int, rows_max: int):
    """A ``step(n_threads, rows)`` factory: one forward + backward of a fresh ``preset`` model on ``rows``
    random sequences (the cost of a step does not depend on the tokens), in the precision ``auto`` picks
    on this CPU. Also returns the preset's batch size."""
    spec = get_preset(preset)
    cfg, batch = spec.model_config(vocab_size=vocab_size), spec.train_config().batch_size
    cpu = torch.device("cpu")
    precision = resolve_precision("auto", cpu)
    torch.manual_seed(0)
    model = GPT(cfg)
    x = torch.randint(0, vocab_size, (batch * rows_max, cfg.block_size))
    y = torch.randint(0, vocab_size, (batch * rows_max, cfg.block_size))

    def step(n_threads: int, rows: int):
        def fn():
            torch.set_num_threads(n_threads)
            with autocast(cpu, precision):
                loss = model(x[:rows], y[:rows]).loss
            loss.backward()
            model.zero_grad(set_to_none=True)

        return fn

    return step, batch


def _neighbour(preset: str, vocab_size: int, ready, stop) -> None:
    """A busy core: one member's step on one thread, over and over, until ``stop`` is set."""
    step, batch = _member_step(preset, vocab_size, 1)
    fn = step(1, batch)
    fn()
    ready.set()
    while not stop.is_set():
        fn()


@contextlib.contextmanager
def neighbours(count: int, preset: str, vocab_size: int):
    """``count`` processes each training a member's step on one thread of its own core, warm on entry."""
    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    ready = [ctx.Event() for _ in range(count)]
    procs = [ctx.Process(target=_neighbour, args=(preset, vocab_size, r, stop), daemon=True) for r in ready]
    for proc in procs:
        proc.start()
    try:
        for r, proc in zip(ready, procs):
            if not r.wait(timeout=300):
                raise RuntimeError(f"a neighbour process did not start (exit code {proc.exitcode})")
        yield
    finally:
        stop.set()
        for proc in procs:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()


def core_bound(
    preset: str, members: int, rounds: int, vocab_size: int = 65
) -> tuple[dict[str, tuple[float, float]], int]:
    """What one core can do for a grid: the least a grid's steps can take side by side, by step timings.

    One forward + backward at the preset's batch (random tokens, ``auto``'s precision) on every core
    and on one thread, and one on one thread with a batch ``members / cores`` times larger (one
    process per core, each training its share of the members batched into one model). Then the step on
    one thread again while every other core trains a member too, as side by side has it: the cores
    share caches and memory. Each maps to the wall time of a grid step against one after another on
    every core. Returns ``{row: (seconds, floor ratio)}`` and the core count."""
    cores = max(1, cpu_cores())
    share = -(-members // cores)  # members per core's process
    step, batch = _member_step(preset, vocab_size, share)
    threads = torch.get_num_threads()
    fns = {
        f"one member on {threads} threads": step(threads, batch),
        "one member on 1 thread": step(1, batch),
        f"{share} members batched (batch × {share}) on 1 thread": step(1, batch * share),
    }
    busy_label = (
        "one member on 1 thread, every other core training one too"
        if cores > 2
        else "one member on 1 thread, the other core training one too"
    )
    try:
        t = {k: median(v) for k, v in interleaved(fns, rounds=rounds, warmup=1).items()}
        if cores > 1:
            with neighbours(cores - 1, preset, vocab_size):
                lone = {busy_label: step(1, batch)}
                t[busy_label] = median(interleaved(lone, rounds=rounds, warmup=1)[busy_label])
    finally:
        torch.set_num_threads(threads)
    every, one, batched = fns
    # one after another: members × every; side by side: each core runs `share` members in turn, or batched
    steps_per_grid = {every: members, one: share, batched: 1, busy_label: share}
    reference = members * t[every]
    return {k: (v, steps_per_grid[k] * v / reference) for k, v in t.items()}, cores


def ratio_of(mode: str, times: dict[str, list[dict]], ref_wall: float) -> float:
    """A mode's median wall seconds per grid against the reference's."""
    return median(r["wall_s"] for r in times[mode]) / ref_wall


def mirrored(modes: list[str], rounds: int) -> list[str]:
    """A B C, C B A, A B C ...: each mode is as often early in a round as late."""
    order: list[str] = []
    for r in range(rounds):
        order += modes if r % 2 == 0 else modes[::-1]
    return order


def run(
    quick: bool = False,
    results=None,
    modes: tuple[str, ...] = DEFAULT_MODES,
    rounds: int = 2,
    iters: int | None = None,
    preset: str = "baby-fast",
) -> dict:
    source = "builtin:tiny" if quick else corpus_source()
    ablations = ABLATIONS[:2] if quick else ABLATIONS
    overrides = dict(max_iters=iters or 20, eval_interval=10, eval_iters=2) if quick else {}
    if iters and not quick:
        overrides.update(max_iters=iters, eval_interval=max(1, iters // 8))
    base = TrainSpec.from_preset("tiny" if quick else preset, source, device="cpu", **overrides)
    n = len(ablations) + 1
    auto_slots, auto_threads = grid_plan(n)
    report = Report(f"Grids: {n} members one after another vs side by side", quick=quick)
    times: dict[str, list[dict]] = {m: [] for m in modes}
    loads = []
    with tempfile.TemporaryDirectory(prefix="tinygpt-bench-grid-") as tmp:
        root = Path(tmp)
        for i, mode in enumerate(mirrored(list(modes), 1 if quick else rounds)):
            load0 = load_average()
            r = run_grid(base, ablations, mode, root / str(i))
            r["load"] = (load0, load_average())
            loads += [x for x in r["load"] if x is not None]
            times[mode].append(r)
            print(f"  {mode}: {r['wall_s']:.1f} s wall, {r['cpu_s']:.1f} s CPU, load {r['load']}", flush=True)
    ref = modes[0]
    ref_wall = median(r["wall_s"] for r in times[ref])
    rows = []
    for m in modes:
        rs = times[m]
        wall = median(r["wall_s"] for r in rs)
        label = (
            f"auto ({auto_slots} at once × {auto_threads} thread{'s' if auto_threads != 1 else ''})"
            if m == "auto"
            else m
        )
        rows.append(
            [
                label,
                "/".join(f"{r['wall_s']:.0f}" for r in rs),
                fmt(wall),
                fmt(median(r["cpu_s"] for r in rs)),
                fmt(wall / ref_wall, 2),
            ]
        )
    step_desc = f"{base.train.max_iters} steps each" + (f", preset {preset}" if not quick else ", preset tiny")
    report.add(
        f"**{n}-member ablation grid** (baseline + {', '.join(ablations)}; {step_desc}) launched with "
        "`state.launch_grid` on a fresh local runner per grid, each member in its own training process. "
        f"Modes in mirrored turns; this machine has {cpu_cores()} core(s) "
        f"(`{auto_slots}` at once × {auto_threads} thread(s) is the runner's default plan for a {n}-member grid). "
        f"Load (1-min) during the runs: {min(loads):.1f}–{max(loads):.1f}."
        if loads
        else ""
    )
    report.add_table(["mode", "wall s per grid", "median wall s", "median CPU s", f"÷ {ref}"], rows)
    cores, whole_floor = cpu_cores(), None
    if "seq-1" in modes and "auto" in modes and ref != "seq-1" and cores > 1:
        ideal = median(r["wall_s"] for r in times["seq-1"]) / min(cores, n)
        whole_floor = ideal / ref_wall
        auto_cpu = median(r["cpu_s"] for r in times["auto"])
        seq1_cpu = median(r["cpu_s"] for r in times["seq-1"])
        unused = 1 - auto_cpu / (cores * median(r["wall_s"] for r in times["auto"]))
        report.add(
            f"**The floor with whole members**: the members on one thread each, one after another, divided "
            f"over the {min(cores, n)} cores is what side by side would take with nothing lost to sharing: "
            f"{fmt(ideal)} s, **{fmt(ideal / ref_wall, 2)}×** {ref}. The grid took "
            f"{fmt(ratio_of('auto', times, ref_wall), 2)}×: at once the members used {fmt(auto_cpu)} CPU s "
            f"against {fmt(seq1_cpu)} in seq-1 ({fmt(auto_cpu / seq1_cpu, 2)}×"
            f"{': the cores share caches and memory' if auto_cpu > 1.01 * seq1_cpu else ''}), and "
            f"{fmt(100 * unused, 0)}% of the cores' time went to no member (processes starting "
            "and ending, the runner handing out work and recording progress)."
        )
    report.add(
        "`seq-T`: one member at a time with T torch threads; `par-KxT`: K members at once, T threads each. "
        "CPU s: the training processes' user + system seconds (more processes take a larger share of a "
        "shared machine, so a ratio well below what the CPU seconds allow is partly the neighbours' loss)."
    )
    bound, precision = batching_bound("tiny" if quick else preset, n, rounds=2 if quick else 10)
    first = bound["one after another"]
    report.add(
        f"**Members batched into one model**: one forward + backward of {n} `{'tiny' if quick else preset}` "
        f"members ({precision}, {torch.get_num_threads()} threads, random tokens), median of "
        f"{2 if quick else 10} interleaved rounds."
    )
    report.add_table(
        ["members", "ms", "÷ one after another"],
        [[k, f"{1e3 * v:.1f}", fmt(v / first, 2)] for k, v in bound.items()],
    )
    cores_rows, _ = core_bound("tiny" if quick else preset, n, rounds=2 if quick else 10)
    report.add(
        f"**What one core can do**: one forward + backward ({precision}, random tokens, median of "
        f"{2 if quick else 10} interleaved rounds), and the least the {n} members' step can then take on "
        f"{cores} core(s) against one after another on every core: one process per core, each training "
        "its share of the members in turn or batched into one model. The last row times the one-thread step "
        "while the other core(s) train a member too, as they do side by side (the cores share caches and "
        "memory). Side by side cannot go under these floors, whatever the processes, evaluations and "
        "checkpoints add."
    )
    report.add_table(
        ["step", "ms", "grid floor ÷ one after another"],
        [[k, f"{1e3 * v:.1f}", fmt(f, 2)] for k, (v, f) in cores_rows.items()],
    )
    report.emit(results)
    ratio = {m: ratio_of(m, times, ref_wall) for m in modes}
    return dict(
        times=times,
        ratio=ratio,
        batching={k: v / first for k, v in bound.items()},
        core_floor={k: f for k, (_, f) in cores_rows.items()},
        whole_floor=whole_floor,
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a 3-member grid of 20-step tiny runs: checks the script")
    ap.add_argument(
        "--modes",
        default=",".join(DEFAULT_MODES),
        help="comma-separated: seq-T, par-KxT, auto (the first is the reference; default %(default)s)",
    )
    ap.add_argument("--rounds", type=int, default=2, help="mirrored rounds (each mode once per round)")
    ap.add_argument("--iters", type=int, help="steps per member (default: the preset's)")
    ap.add_argument("--preset", default="baby-fast", help="the grid's baseline preset (default %(default)s)")
    ap.add_argument("--results", type=Path, metavar="FILE", help="append the table here instead")
    args = ap.parse_args(argv)
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    run(args.quick, args.results, modes=modes, rounds=args.rounds, iters=args.iters, preset=args.preset)


if __name__ == "__main__":
    main()
