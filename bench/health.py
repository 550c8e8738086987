"""Bench 11: what logging network health costs training (per-layer gradient norm, update ratio, activation RMS).

Two side-by-side measurements on the ``baby`` model over Tiny Shakespeare:

1. Whole runs, alternating (with, without, with, without ...): ``training.train`` with health logged at
   each evaluation (``health.LOG_HEALTH``, the default) and with it off. An evaluation every 25 steps, ten
   times as often as the ``baby`` preset's 250, so the per-evaluation cost shows. Tokens/s is trained
   tokens over the run's logged time (metrics.csv ``elapsed_s``, evaluations included).
2. The pieces, interleaved (steadier than whole runs on a shared machine): one plain optimizer step; one
   probed step (``health.StepProbe``: gradient norms, a copy of the block weights, update norms); an
   evaluation with and without the activation-RMS hooks; and the model's hook points, which every
   forward pass crosses whether or not anything listens, against the same step with them taken out.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from bench.common import Report, corpus_source, interleaved, interval_note, median
from tinygpt_core import health
from tinygpt_core.hooks import HookPoint
from tinygpt_core.runs import RunStore, read_metrics
from tinygpt_core.spec import prepare
from tinygpt_core.training import TrainSpec, train
from tinygpt_core.trainstate import TrainState

TARGET = 0.05
EVAL_INTERVAL = 25


def make_spec(source: str, iters: int) -> TrainSpec:
    return TrainSpec.from_preset(
        "baby", source, max_iters=iters, eval_interval=EVAL_INTERVAL, eval_iters=5, sample_tokens=0, device="cpu"
    )


def tokens_per_s(run_dir: Path, spec: TrainSpec) -> float:
    m = read_metrics(run_dir)
    steps, elapsed = int(m["step"].iloc[-1]), float(m["elapsed_s"].iloc[-1])
    return steps * spec.train.batch_size * spec.model.block_size / elapsed


def whole_run(store: RunStore, source: str, iters: int, on: bool) -> float:
    spec = make_spec(source, iters)
    health.LOG_HEALTH = on
    try:
        result = train(spec, store.create("health" if on else "plain"))
    finally:
        health.LOG_HEALTH = True
    return tokens_per_s(result.run_dir, spec)


def _without_hook_points(model: torch.nn.Module) -> None:
    """Swap every HookPoint for a plain function: the model as it was before hook points existed."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, HookPoint):
                delattr(module, child_name)
                setattr(module, child_name, lambda x: x)


def run(quick: bool = False, results=None) -> dict:
    source = corpus_source()
    iters, rounds = (50, 1) if quick else (100, 5)
    with tempfile.TemporaryDirectory() as tmp:
        store = RunStore(Path(tmp))
        runs: dict[str, list[float]] = {"with health": [], "without": []}
        for _ in range(rounds):
            runs["with health"].append(whole_run(store, source, iters, True))
            runs["without"].append(whole_run(store, source, iters, False))
    with_h, without = median(runs["with health"]), median(runs["without"])
    run_cost = 1 - with_h / without

    prepared = prepare(make_spec(source, 10))  # precision as the runs above resolved it (auto)
    p = prepared
    # One model per kind of call, built alike, and the steps timed apart from the evaluations: the call
    # right after an evaluation (larger batches, other buffers) ran 7-10% slower here, which would be
    # charged to whichever step came next in the turns.
    states = {
        k: TrainState(p.model_config, p.spec.train, p.train_ids, p.device, p.precision)
        for k in ("plain", "probed", "no hooks", "eval")
    }
    _without_hook_points(states["no hooks"].model)
    lr = prepared.spec.train.lr
    fns = {
        "plain step": lambda: states["plain"].train_step(lr),
        "probed step (evaluation steps only)": lambda: states["probed"].train_step(
            lr, probe=health.StepProbe(states["probed"].model)
        ),
        "plain step, hook points taken out": lambda: states["no hooks"].train_step(lr),
    }
    data = (p.train_ids, p.val_ids)

    def eval_with_rms() -> None:
        with health.activation_rms(states["eval"].model):
            states["eval"].estimate_losses(data)

    evals = {
        "evaluation (5 batches of train and val)": lambda: states["eval"].estimate_losses(data),
        "evaluation with activation RMS": eval_with_rms,
    }
    step_rounds = 5 if quick else 20
    ms = {
        k: median(v) * 1e3
        for group in (fns, evals)
        for k, v in interleaved(group, rounds=step_rounds, warmup=2).items()
    }
    probe_extra = ms["probed step (evaluation steps only)"] - ms["plain step"]
    eval_extra = ms["evaluation with activation RMS"] - ms["evaluation (5 batches of train and val)"]
    interval = EVAL_INTERVAL * ms["plain step"] + ms["evaluation (5 batches of train and val)"]
    per_interval = (probe_extra + eval_extra) / interval
    hook_cost = ms["plain step"] / ms["plain step, hook points taken out"] - 1

    report = Report("11. Network health logging: cost to training throughput (`baby`)", quick=quick)
    report.add(
        f"Whole runs of {iters} steps, evaluation every {EVAL_INTERVAL} steps (5 batches), {prepared.precision}, "
        f"{rounds} of each in turns; median tokens/s over each run's logged time."
    )
    report.add_table(
        ["training", "tokens/s (median)", "runs"],
        [[k, f"{median(v):,.0f}", ", ".join(f"{x:,.0f}" for x in v)] for k, v in runs.items()],
    )
    report.add(
        f"Whole-run cost of health logging: {run_cost:+.1%} of throughput (target < {TARGET:.0%}; "
        f"{interval_note(runs['without'], runs['with health'])})."
    )
    report.add_table(["one optimizer step", "ms (median)"], [[k, f"{v:.1f}"] for k, v in ms.items()])
    report.add(
        f"Health adds {probe_extra:.1f} ms to the probed step and {eval_extra:.1f} ms to the evaluation, once every "
        f"{EVAL_INTERVAL} steps: {per_interval:.2%} of an interval's time (steps and evaluation), the cost to "
        f"throughput built from the pieces. Hook points crossed by every forward pass: {hook_cost:+.1%} of a step."
    )
    report.emit(results)
    return dict(run_cost=run_cost, probe_ms=probe_extra, eval_ms=eval_extra, cost=per_interval, hook_cost=hook_cost)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one short run each: checks the script")
    args = ap.parse_args(argv)
    run(args.quick)


if __name__ == "__main__":
    main()
