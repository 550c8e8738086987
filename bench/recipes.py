"""Bench 2b: how the ``baby-fast`` recipe was chosen: variants of it on tuning seeds, judged on the whole split.

The time-to-quality table (``bench.convergence``) trains ``baby-fast`` on seeds 1337, 1 and 2. Its recipe
(learning rate, warm-up, number of steps) was chosen here, on **other** seeds (11, 12, 13), so that those
figures are not the best of several tries on the very seeds they report. Every variant below trains to
the end of its own schedule and is judged like the convergence table judges a run: on the whole
validation split, at each of its evaluations, by ``bench.convergence``'s own child process.

The runs are in fp32, the precision ``auto`` picks on a CPU without native bf16 (the slower of the two
paths, where the 0.4× target was missed); bf16 runs follow the same curves within noise. Quality does
not depend on the number of threads, so the runs go side by side, one thread each, to save time: this
table says nothing about speed. Time per step is the convergence table's business.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.common import Report, corpus_source
from bench.convergence import PRESET, TARGET, _spread, run_ours

TUNING_SEEDS = (11, 12, 13)  # never the convergence table's seeds (1337, 1, 2)
# label -> overrides of the preset, in the order they were tried; {} is the preset as it ships. Each
# keeps the preset's floor (min_lr 5e-4) unless it says otherwise.
VARIANTS: dict[str, dict] = {
    "lr 5e-3, warm-up 50, 400 steps (the recipe before)": dict(lr=5e-3, warmup_iters=50, max_iters=400),
    "lr 5e-3, warm-up 50, 350 steps": dict(lr=5e-3, warmup_iters=50, max_iters=350),
    "lr 7e-3, warm-up 25, 350 steps": dict(lr=7e-3, warmup_iters=25, max_iters=350),
    "lr 1e-2, warm-up 25, 300 steps": dict(lr=1e-2, warmup_iters=25, max_iters=300),
    "lr 1.4e-2, warm-up 25, 300 steps": dict(lr=1.4e-2, warmup_iters=25, max_iters=300),
    "lr 2e-2 (floor 2e-3), warm-up 25, 300 steps": dict(lr=2e-2, min_lr=2e-3, warmup_iters=25, max_iters=300),
    "baby-fast as it ships (lr 1.4e-2, warm-up 25, 350 steps)": {},
}
QUICK = dict(max_iters=20, eval_interval=10, eval_iters=2)  # a smoke run: the harness works, no figure


def whole_at(run: dict, step: int) -> float | None:
    """A run's whole-split val at ``step`` (None: no evaluation there, or none on the whole split)."""
    return next((e["whole"] for e in run["evals"] if e["step"] == step), None)


def first_step_all_reach(runs: list[dict], target: float) -> int | None:
    """The first evaluated step at which every run's whole-split val is at or under ``target``."""
    steps = sorted({e["step"] for r in runs for e in r["evals"]})
    for step in steps:
        vals = [whole_at(r, step) for r in runs]
        if all(v is not None and v <= target for v in vals):
            return step
    return None


def run(
    quick: bool = False,
    results: Path | None = None,
    seeds: tuple[int, ...] = TUNING_SEEDS,
    preset: str = PRESET,
    target: float = TARGET,
) -> dict:
    source = corpus_source()
    variants = dict(list(VARIANTS.items())[-2:]) if quick else VARIANTS
    seeds = seeds[:1] if quick else seeds
    if quick:
        target = 3.5
    jobs = [(label, seed) for label in variants for seed in seeds]
    workers = max(1, min(len(jobs), os.cpu_count() or 1))
    out: dict[str, list[dict]] = {label: [] for label in variants}

    with tempfile.TemporaryDirectory(prefix="tinygpt-bench-recipes-") as tmp:

        def one(job: tuple[str, int]) -> dict:
            label, seed = job
            overrides = {**variants[label], **(QUICK if quick else {})}
            cfg = dict(
                preset=preset,
                corpus=source,
                seed=seed,
                precision="fp32",
                overrides=overrides,
                run_dir=str(Path(tmp) / f"{list(variants).index(label)}-{seed}"),
                target=target,
                stop_at_target=False,  # the whole schedule: how far past the target each variant ends
            )
            r = run_ours(cfg, {"OMP_NUM_THREADS": "1"})
            last = r["evals"][-1]
            print(f"  {label}, seed {seed}: whole-split val {last['whole']:.3f} at step {last['step']}", flush=True)
            return r

        with ThreadPoolExecutor(workers) as pool:  # each job is its own process; threads only wait on them
            for (label, _), r in zip(jobs, pool.map(one, jobs)):
                out[label].append(r)

    steps = sorted({e["step"] for rs in out.values() for r in rs for e in r["evals"]})
    shown = steps[-5:]  # the last evaluations, where the variants part
    rows = []
    for label, rs in out.items():
        at = []
        for step in shown:
            vals = [whole_at(r, step) for r in rs]
            at.append(_spread(vals) if any(v is not None for v in vals) else "")
        hit = first_step_all_reach(rs, target)
        rows.append([label, rs[0]["steps"], *at, "–" if hit is None else hit])
    report = Report(f"2b. How the {preset} recipe was chosen (tuning seeds)", quick=quick)
    report.add(
        f"Variants of `{preset}` over tuning seeds {', '.join(map(str, seeds))} (not the convergence table's), "
        f"each trained to the end of its schedule in fp32 and judged on the whole validation split at every "
        f"evaluation. Cells: median (min–max) over seeds. The last column is the first evaluated step at which "
        f"every seed is at or under {target}: a run of that recipe stops there in the convergence table."
    )
    report.add_table(["variant", "steps", *(f"val @ {s}" for s in shown), f"all ≤ {target} at"], rows)
    report.emit(results)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 variants, 1 seed, 20 steps: checks the harness only")
    ap.add_argument("--seeds", default=",".join(map(str, TUNING_SEEDS)), help="tuning seeds (default %(default)s)")
    ap.add_argument("--target", type=float, default=TARGET, help="whole-split val loss (default %(default)s)")
    ap.add_argument("--results", type=Path, metavar="FILE", help="append the table here instead")
    args = ap.parse_args(argv)
    run(args.quick, args.results, seeds=tuple(int(s) for s in args.seeds.split(",") if s.strip()), target=args.target)


if __name__ == "__main__":
    main()
