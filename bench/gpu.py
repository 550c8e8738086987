"""Bench 12: the GPU figures, on this machine's CUDA GPU; without one it says they were not measured.

Three measurements, each made the way a user's run makes it, and written with the GPU's name:

1. **Time to whole-split val 1.47 with ``shakespeare-char``** (nanoGPT's GPU recipe; its README reports
   about 3 minutes on an A100; our target is under 90 s on an H100/H200). The convergence bench's
   child trains in a fresh process (imports, compile and evals included) and judges every eval's
   weights on the whole validation split, on the GPU; the evaluation's own seconds are subtracted.
   ``auto`` precision (bf16 on a GPU that has it) with ``torch.compile``. With ``--nanogpt PATH`` its
   own ``train.py`` runs its GPU recipe (``config/train_shakespeare_char.py``) side by side.
2. **Tokens/s of one training step** at ``baby`` and ``shakespeare-char`` sizes through the training
   loop's own step (fused AdamW, clipping, flash attention through SDPA on CUDA), in turns: fp32, bf16
   autocast, bf16 with ``torch.compile``, and bf16 with compile's CUDA graphs (``reduce-overhead``),
   which is what tiny models need when kernel launches, not maths, bound a step.
3. **Tiny runs sharing one GPU**: 1, 4 and 16 ``baby`` runs, each its own process (as the runners start
   them), released together once all are warm; aggregate tokens/s over the span from the first start
   to the last finish.

``--quick`` runs the same harness on whatever device there is at toy sizes (on a CPU: no compile, 1 and
2 processes), so CI checks the script; its figures are smoke. A full run without a GPU writes one line:
not measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import REPO, Report, corpus_source, fmt, interleaved, median
from bench.convergence import MARK, nanogpt_problem, prepare_nanogpt, run_nanogpt, run_ours
from bench.steps import our_step
from bench.throughput import load_ids
from tinygpt_core.config import get_preset

TARGET = 1.47  # nanoGPT's README: its Shakespeare-char GPU recipe ends at val loss about 1.4697
TARGET_S = 90.0
SEEDS = (1337, 1, 2)
PACKING = (1, 4, 16)
NANOGPT_GPU_RECIPE = ("config/train_shakespeare_char.py", "--log_interval=50")
# (label, precision, torch.compile mode or None); fused AdamW and SDPA are in every row.
VARIANTS = (
    ("fp32", "fp32", None),
    ("bf16 autocast", "bf16", None),
    ("bf16 + torch.compile", "bf16", "default"),
    ("bf16 + compile, CUDA graphs", "bf16", "reduce-overhead"),
)
PARTS = ("quality", "throughput", "packing")


def gpu_name() -> str | None:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


# ---------------------------------------------------------------------------------------------
# 1. Time to quality


def time_to_quality(report: Report, seeds: tuple[int, ...], quick: bool, nanogpt: str | None, work: Path) -> dict:
    cuda = torch.cuda.is_available()
    target = 4.0 if quick else TARGET
    overrides: dict = {"compile": cuda}
    if quick:  # a toy model of 20 steps: checks the harness, not the figure
        overrides |= dict(n_layer=2, n_head=2, n_embd=64, block_size=32, batch_size=4, dropout=0.0)
        overrides |= dict(max_iters=20, eval_interval=10, eval_iters=2)
    runs = []
    for seed in seeds:
        cfg = dict(
            preset="shakespeare-char",
            corpus=corpus_source(),
            seed=seed,
            precision="auto",
            overrides=overrides,
            run_dir=str(work / f"quality-{seed}"),
            target=target,
            stop_at_target=True,
        )
        r = run_ours(cfg)
        runs.append(r)
        h = r["hit"]
        print(f"  shakespeare-char seed {seed}: " + (f"{h['s']:.1f} s at step {h['step']}" if h else "missed"))
    hits = [r["hit"] for r in runs]
    reached = sum(h is not None for h in hits)
    med = median(h["s"] for h in hits) if reached == len(hits) else None
    rows = [
        [
            seed,
            r["precision"],
            "yes" if r["hit"] else "no",
            r["hit"]["step"] if r["hit"] else "–",
            fmt(r["hit"]["s"]) if r["hit"] else "–",
            fmt(min((e["whole"] for e in r["evals"] if e["whole"] is not None), default=None), 4),
            fmt(r["imported_s"]),
        ]
        for seed, r in zip(seeds, runs)
    ]
    report.add(
        f"**Time to whole-split val {target}, `shakespeare-char`** (a fresh process per seed, timed from its "
        "spawn to the end of the eval at the first step whose weights reach the target on the whole validation "
        f"split, the evaluation's own seconds subtracted; `auto` precision, torch.compile {'on' if cuda else 'off'}):"
    )
    report.add_table(["seed", "precision", "reached", "step", "seconds", "best whole-split val", "import s"], rows)
    verdict = "–" if med is None else f"{med:.1f} s"
    report.add(
        f"Median over {len(seeds)} seed{'s' if len(seeds) > 1 else ''}: {verdict} ({reached}/{len(seeds)} reached it; "
        f"target under {TARGET_S:.0f} s on an H100/H200)."
    )
    out = dict(runs=runs, median_s=med, reached=reached)
    problem = nanogpt_problem(Path(nanogpt) if nanogpt else None)
    if problem or not cuda:
        report.add(f"nanoGPT's GPU recipe not run: {problem or 'it needs a CUDA GPU'}.")
        return out
    nano_work = prepare_nanogpt(Path(nanogpt), Path(corpus_source()), work / "nanogpt")
    nano = run_nanogpt(nano_work, target, recipe=NANOGPT_GPU_RECIPE)
    out["nanogpt"] = nano
    h = nano["hit"]
    got = f"{h['s']:.1f} s at step {h['step']}" if h else "did not reach it"
    report.add(
        "nanoGPT's own `train.py` with `config/train_shakespeare_char.py` (its GPU recipe: bf16, compile), same "
        "corpus and GPU, timed from its spawn to the eval line whose estimate (200 random batches) first reaches "
        f"the target: {got}" + (f"; ours ÷ nanoGPT {med / h['s']:.2f}." if h and med else ".")
    )
    return out


# ---------------------------------------------------------------------------------------------
# 2. Tokens/s of one step


def step_variants(report: Report, quick: bool) -> dict:
    cuda = torch.cuda.is_available()
    train_ids, vocab = load_ids()
    variants = VARIANTS if cuda else VARIANTS[:2]  # compile on a CPU takes minutes: not a smoke test's job
    out = {}
    for preset in ("baby",) if quick else ("baby", "shakespeare-char"):
        p = get_preset(preset)
        mcfg, tcfg = p.model_config(vocab_size=vocab), p.train_config(device="auto")
        if quick:
            tcfg = dataclasses.replace(tcfg, batch_size=2)
        steppers, compile_s = {}, {}
        for label, precision, mode in variants:
            s = our_step(mcfg, tcfg, train_ids, precision=precision, name=label, compile_mode=mode)
            t0 = time.perf_counter()
            s.step()  # the first step compiles (and captures the graphs): its time is reported apart
            compile_s[label] = time.perf_counter() - t0
            steppers[label] = s
        times = interleaved({k: s.step for k, s in steppers.items()}, rounds=3 if quick else 30, warmup=3)
        rows, base = [], None
        for label, s in steppers.items():
            tps = s.tokens_per_step / median(times[label])
            base = base or tps
            note = f" ({'; '.join(s.notes)})" if s.notes else ""  # a compile that fell back to eager says so
            ms = median(times[label]) * 1e3
            rows.append([label + note, f"{ms:.2f}", f"{tps:,.0f}", f"{tps / base:.2f}×", f"{compile_s[label]:.1f}"])
        b, t = tcfg.batch_size, mcfg.block_size
        report.add(f"**Tokens/s, `{preset}`** (batch {b}, context {t}; median of the interleaved steps):")
        report.add_table(["step", "ms/step", "tokens/s", "vs fp32", "first step s (compile)"], rows)
        out[preset] = {label: s.tokens_per_step / median(times[label]) for label, s in steppers.items()}
    if cuda:
        flash, efficient = torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled()
        report.add(
            "Attention runs through `scaled_dot_product_attention`; "
            f"flash kernels enabled: {flash}, memory-efficient: {efficient}."
        )
    return out


# ---------------------------------------------------------------------------------------------
# 3. Tiny runs sharing one GPU


def pack_child(cfg: dict) -> int:
    """One ``baby`` run in this process (the training loop's own step): warm up, say ready, wait for "go"
    on stdin, time the steps."""
    train_ids, vocab = load_ids()
    p = get_preset("baby")
    tcfg = p.train_config(device="auto", **cfg["train"])
    run = our_step(p.model_config(vocab_size=vocab), tcfg, train_ids, seed=cfg["seed"])
    for _ in range(cfg["warmup"]):
        run.step()
    print(MARK + json.dumps({"ready": True}), flush=True)
    sys.stdin.readline()
    t0 = time.time()
    for _ in range(cfg["steps"]):
        run.step()
    t1 = time.time()
    print(MARK + json.dumps({"t0": t0, "t1": t1, "tokens": cfg["steps"] * run.tokens_per_step}), flush=True)
    return 0


def packed(n: int, steps: int, warmup: int, train: dict) -> dict:
    """``n`` runs at once, released together; aggregate and per-run tokens/s."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    child = [sys.executable, "-m", "bench.gpu", "--pack-child"]
    procs = [
        subprocess.Popen(
            [*child, json.dumps(dict(seed=i, steps=steps, warmup=warmup, train=train))],
            cwd=REPO,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(n)
    ]
    try:
        for p in procs:  # every run warm before any is timed
            _read_mark(p)
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        ends = [_read_mark(p) for p in procs]
    finally:  # the runs have said all they will; none outlives the measurement
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    span = max(e["t1"] for e in ends) - min(e["t0"] for e in ends)
    per_run = [e["tokens"] / (e["t1"] - e["t0"]) for e in ends]
    return dict(n=n, aggregate=sum(e["tokens"] for e in ends) / span, per_run=median(per_run))


def _read_mark(proc: subprocess.Popen) -> dict:
    for line in proc.stdout:
        if line.startswith(MARK):
            return json.loads(line[len(MARK) :])
    raise RuntimeError(f"a packed run ended early (exit {proc.wait()}): {proc.stderr.read()[-1500:]}")


def packing(report: Report, quick: bool) -> dict:
    counts, steps, warmup = ((1, 2), 3, 1) if quick else (PACKING, 200, 20)
    train = dict(batch_size=2) if quick else {}
    rows, out = [], {}
    for n in counts:
        r = packed(n, steps, warmup, train)
        out[n] = r
        one = out[counts[0]]["aggregate"]
        rows.append([n, f"{r['aggregate']:,.0f}", f"{r['aggregate'] / one:.2f}×", f"{r['per_run']:,.0f}"])
        print(f"  {n} packed: {r['aggregate']:,.0f} tokens/s in all", flush=True)
    report.add(
        f"**Tiny runs sharing one {'GPU' if torch.cuda.is_available() else 'device'}**: `baby` runs (auto precision), "
        f"each its own process, released together after {warmup} warm-up steps; {steps} timed steps each:"
    )
    report.add_table(["runs at once", "aggregate tokens/s", "vs one run", "tokens/s per run (median)"], rows)
    return out


# ---------------------------------------------------------------------------------------------


def run(
    quick: bool = False,
    results=None,
    nanogpt: str | None = None,
    seeds: tuple[int, ...] = SEEDS,
    parts: tuple[str, ...] = PARTS,
) -> dict:
    name = gpu_name()
    report = Report("12. GPU: time to quality, step variants, tiny runs sharing one GPU", quick=quick)
    if name is None and not quick:
        report.add(
            "**Not measured: this machine has no CUDA GPU** (`torch.cuda.is_available()` is False). "
            "`python -m bench.gpu` on a machine with one writes these figures with the GPU's name."
        )
        report.emit(results)
        return {"gpu": None}
    report.add(f"Device: **{name or 'CPU (a smoke run of the harness; no GPU here)'}**.")
    out: dict = {"gpu": name}
    with tempfile.TemporaryDirectory(prefix="tinygpt-bench-gpu-") as tmp:
        if "quality" in parts:
            out["quality"] = time_to_quality(report, seeds[:1] if quick else seeds, quick, nanogpt, Path(tmp))
        if "throughput" in parts:
            out["throughput"] = step_variants(report, quick)
        if "packing" in parts:
            out["packing"] = packing(report, quick)
    report.emit(results)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="toy sizes on whatever device there is: checks the script")
    ap.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="comma-separated seeds (default %(default)s)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of: {', '.join(PARTS)}")
    ap.add_argument("--nanogpt", metavar="PATH", help="a nanoGPT checkout: run its GPU recipe side by side")
    ap.add_argument("--results", type=Path, metavar="FILE", help="append the tables here instead")
    ap.add_argument("--pack-child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.pack_child:
        sys.exit(pack_child(json.loads(args.pack_child)))
    parts = tuple(p.strip() for p in args.parts.split(",") if p.strip())
    bad = [p for p in parts if p not in PARTS]
    if bad:
        ap.error(f"unknown part(s) {', '.join(bad)}; choose from {', '.join(PARTS)}")
    seeds = tuple(int(s) for s in args.seeds.split(",") if s.strip())
    run(args.quick, args.results, args.nanogpt, seeds, parts)


if __name__ == "__main__":
    main()
