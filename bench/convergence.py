"""Bench 2: time to quality on char-level Tiny Shakespeare, judged on the whole validation split.

What it measures, and how (each choice answers a way the figure could flatter us):

* **Quality is the whole validation split**, every token of it in non-overlapping context windows,
  evaluated on the weights of every eval the run makes. The run's own estimate (a few fixed windows)
  is printed beside it but never decides anything.
* **Several seeds** (3 by default): the median and the range are reported, and "reached" means every
  seed reached the target.
* **Time from a fresh process**: each run is a new ``python`` process (imports, corpus, tokenizer,
  evals and checkpoints included) timed from its spawn to the moment the eval at the first step whose
  weights reach the target on the whole split had finished. The whole-split evaluation itself is
  measurement, not training: its seconds are subtracted, and a run stops at the first step past the
  target (``--full-schedule`` runs on to the end).
* **The peer runs side by side**: with ``--nanogpt PATH`` (a checkout of github.com/karpathy/nanoGPT),
  its own ``train.py`` runs its README's CPU recipe on the same corpus in a temporary folder, in turns
  with ours, timed the same way to the first eval whose (fresh-window, nanoGPT's own) estimate reaches
  the target. Without a checkout the comparison is skipped, and no nanoGPT time is printed.
* **fp32 and bf16 separately**, and a CPU without native bf16 emulated with ``ONEDNN_MAX_CPU_ISA=AVX2``
  (there ``auto`` must pick fp32, and Muon's Newton–Schulz runs in fp32: checked at the start).
  nanoGPT trains in fp32 on a CPU (its train.py has no CPU autocast), so bf16 rows compare our bf16
  with its fp32, and say so.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import REPO, Report, corpus_source, fmt, load_average, median

TARGET = 1.886  # nanoGPT's README: its CPU recipe ends at val loss 1.88; the target is 1.886
PRESET = "baby-fast"
SEEDS = (1337, 1, 2)
MARK = "@@bench "  # prefix of the child's JSON lines on stdout
AVX2 = {"ONEDNN_MAX_CPU_ISA": "AVX2"}
# nanoGPT's README, "I only have a macbook": its CPU recipe for Shakespeare-char.
NANOGPT_RECIPE = (
    "config/train_shakespeare_char.py",
    "--device=cpu",
    "--compile=False",
    "--eval_iters=20",
    "--log_interval=1",
    "--block_size=64",
    "--batch_size=12",
    "--n_layer=4",
    "--n_head=4",
    "--n_embd=128",
    "--max_iters=2000",
    "--lr_decay_iters=2000",
    "--dropout=0.0",
)
NANOGPT_FILES = ("train.py", "model.py", "configurator.py", "config/train_shakespeare_char.py")


# ---------------------------------------------------------------------------------------------
# Quality on the whole validation split


def whole_split_loss(model: torch.nn.Module, val: torch.Tensor, block_size: int, batch: int = 256) -> float:
    """Mean cross-entropy of every validation token, in non-overlapping windows of ``block_size``.

    Every window predicts its tokens from 1..block_size tokens of context, the mix nanoGPT's random
    windows have, without their sampling noise. fp32, whatever the run trained in.
    """
    n = (len(val) - 1) // block_size
    x = val[: n * block_size].view(n, block_size)
    y = val[1 : n * block_size + 1].view(n, block_size)
    total = 0.0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, n, batch):
            logits = model(x[i : i + batch]).logits.float()
            total += F.cross_entropy(
                logits.reshape(-1, logits.size(-1)), y[i : i + batch].reshape(-1), reduction="sum"
            ).item()
    model.train(was_training)
    return total / (n * block_size)


# ---------------------------------------------------------------------------------------------
# The child: one of our runs in a fresh process


def child(cfg: dict) -> int:
    """Train ``cfg`` (preset, corpus, seed, precision, overrides); print one JSON line per eval."""
    from tinygpt_core.checkpoints import last_checkpoint, load_model_state, read_weights
    from tinygpt_core.data import load_corpus, split_ids
    from tinygpt_core.device import resolve_device
    from tinygpt_core.runs import load_run
    from tinygpt_core.training import TrainSpec, train

    def say(kind: str, **data) -> None:
        print(MARK + json.dumps({"kind": kind, "t": time.time(), **data}), flush=True)

    say("imported")
    import threading

    run_dir = Path(cfg["run_dir"])
    spec = TrainSpec.from_preset(
        cfg["preset"], cfg["corpus"], seed=cfg["seed"], precision=cfg["precision"], **cfg["overrides"]
    )
    stop = threading.Event()
    st: dict = {"pending": None, "overhead": 0.0, "model": None, "val": None}

    def judge() -> None:
        step, t_eval, estimate = st["pending"]
        st["pending"] = None
        t0 = time.perf_counter()
        overhead_before = st["overhead"]
        ckpt = last_checkpoint(run_dir)
        whole = None
        if ckpt is not None and ckpt.step == step:
            if st["model"] is None:  # the first eval: the model's shape, and the split's tokens, once
                device = resolve_device(spec.train.device)  # judged where it trains: seconds, not minutes, on a GPU
                run = load_run(run_dir, checkpoint="last", device=device.type)
                st["model"] = run.model.float()
                ids = torch.tensor(run.tokenizer.encode(load_corpus(cfg["corpus"]).text), dtype=torch.long)
                st["val"] = split_ids(ids, run.config.train.val_fraction)[1].to(device)
            else:
                load_model_state(st["model"], read_weights(run_dir, "last"))
            whole = whole_split_loss(st["model"], st["val"], st["model"].config.block_size)
        st["overhead"] += time.perf_counter() - t0
        say("eval", step=step, t_eval=t_eval, overhead_before=overhead_before, estimate=estimate, whole=whole)
        if whole is not None and whole <= cfg["target"] and cfg["stop_at_target"]:
            stop.set()

    def on_event(ev) -> None:
        if ev.kind == "start":
            say("start", precision=ev.data["precision"])
        elif ev.kind == "eval":
            st["pending"] = (ev.step, time.time(), ev.data["val_loss"])
        elif ev.kind in ("step", "end") and st["pending"] is not None:
            judge()  # the eval's checkpoint is on disk by the next step (and by the end)

    result = train(spec, run_dir, callbacks=[on_event], stop_event=stop)
    if st["pending"] is not None:
        judge()
    say("end", status=result.status, steps=result.steps, message=result.message)
    return 0


def run_ours(cfg: dict, env: dict | None = None) -> dict:
    """Spawn the child for ``cfg``; its evals with times from the spawn, measurement overhead removed."""
    t_spawn = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "bench.convergence", "--child", json.dumps(cfg)],
        cwd=REPO,
        env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
    )
    events = [json.loads(line[len(MARK) :]) for line in proc.stdout.splitlines() if line.startswith(MARK)]
    end = next((e for e in events if e["kind"] == "end"), None)
    if proc.returncode or end is None:
        raise RuntimeError(f"our run failed (exit {proc.returncode}): {proc.stderr[-1500:]}")
    evals = [
        dict(step=e["step"], s=e["t_eval"] - t_spawn - e["overhead_before"], estimate=e["estimate"], whole=e["whole"])
        for e in events
        if e["kind"] == "eval"
    ]
    imported = next(e["t"] for e in events if e["kind"] == "imported") - t_spawn
    precision = next((e["precision"] for e in events if e["kind"] == "start"), "?")
    hit = next((e for e in evals if e["whole"] is not None and e["whole"] <= cfg["target"]), None)
    return dict(
        evals=evals, hit=hit, imported_s=imported, precision=precision, status=end["status"], steps=end["steps"]
    )


# ---------------------------------------------------------------------------------------------
# nanoGPT's own train.py, side by side


def nanogpt_problem(path: Path | None) -> str | None:
    """Why ``path`` cannot be used as a nanoGPT checkout (None: it can)."""
    if path is None:
        return "no nanoGPT checkout given (--nanogpt PATH)"
    missing = [f for f in (*NANOGPT_FILES, "data/shakespeare_char/prepare.py") if not (Path(path) / f).is_file()]
    if missing:
        return f"{path} is not a nanoGPT checkout (missing {', '.join(missing)})"
    return None


def prepare_nanogpt(checkout: Path, corpus: Path, work: Path) -> Path:
    """A throw-away copy of nanoGPT's training files with the corpus prepared as its prepare.py does.

    The checkout is never written to; the corpus is linked (not copied), and prepare.py finds it as
    its input.txt, so it downloads nothing."""
    for f in (*NANOGPT_FILES, "data/shakespeare_char/prepare.py"):
        (work / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(checkout / f, work / f)
    (work / "data/shakespeare_char/input.txt").symlink_to(Path(corpus).resolve())
    proc = subprocess.run(
        [sys.executable, "prepare.py"], cwd=work / "data/shakespeare_char", capture_output=True, text=True
    )
    if proc.returncode:
        raise RuntimeError(f"nanoGPT's prepare.py failed: {proc.stderr[-1500:]}")
    return work


def run_nanogpt(
    work: Path,
    target: float,
    env: dict | None = None,
    max_iters: int | None = None,
    recipe: tuple[str, ...] = NANOGPT_RECIPE,
) -> dict:
    """nanoGPT's train.py with a recipe (its CPU one by default); evals timed from the spawn as their lines arrive.

    It is stopped at the first eval whose estimate reaches ``target`` (its estimate is fresh random
    batches per eval: 20 in the CPU recipe, 200 in the GPU one)."""
    args = list(recipe)
    if max_iters:
        args += [
            f"--max_iters={max_iters}",
            f"--lr_decay_iters={max_iters}",
            f"--eval_interval={max(1, max_iters // 4)}",
        ]
    out_dir = work / f"out-{time.monotonic_ns()}"
    t_spawn = time.time()
    proc = subprocess.Popen(
        [sys.executable, "train.py", *args, f"--out_dir={out_dir}"],
        cwd=work,
        env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    evals, tail = [], []
    assert proc.stdout is not None
    for line in proc.stdout:
        now = time.time()
        tail = (tail + [line])[-20:]
        if line.startswith("step ") and "val loss" in line:
            step = int(line.split()[1].rstrip(":"))
            val = float(line.rsplit("val loss", 1)[1].strip().rstrip(","))
            evals.append(dict(step=step, s=now - t_spawn, estimate=val, whole=None))
            if step > 0 and val <= target:
                proc.terminate()
                break
    proc.wait()
    if not evals:
        raise RuntimeError("nanoGPT's train.py logged no eval:\n" + "".join(tail))
    hit = next((e for e in evals if e["step"] > 0 and e["estimate"] <= target), None)
    return dict(evals=evals, hit=hit, steps=evals[-1]["step"], precision="fp32")


# ---------------------------------------------------------------------------------------------
# Muon's Newton–Schulz precision follows the hardware


def ns_check() -> dict:
    """In this process: the dtype Muon picks on this CPU, and a 5-step Newton–Schulz on 128×512 in both."""
    from tinygpt_core.muon import native_bf16, orthogonalise

    cpu = torch.device("cpu")
    x = torch.randn(1, 128, 512)
    times = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        xx = x.to(dtype)
        orthogonalise(xx)
        ts = []
        for _ in range(5):
            t0 = time.perf_counter()
            orthogonalise(xx)
            ts.append(time.perf_counter() - t0)
        times[name] = median(ts) * 1000
    return dict(picks="bf16" if native_bf16(cpu) else "fp32", ms=times)


def ns_check_in(env: dict | None) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.convergence", "--ns-check"],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith(MARK)), None)
    if line is None:
        raise RuntimeError(f"the Newton–Schulz check failed: {proc.stderr[-1500:]}")
    return json.loads(line[len(MARK) :])


# ---------------------------------------------------------------------------------------------
# The suite


MODES = {  # name -> (precision asked of our run, extra environment, what it stands for)
    "fp32": ("fp32", {}, "fp32 on this CPU"),
    "bf16": ("bf16", {}, "bf16 autocast on this CPU (native bf16)"),
    "no-bf16": ("auto", AVX2, "auto with ONEDNN_MAX_CPU_ISA=AVX2 (a CPU without native bf16)"),
}


def _spread(xs: list[float | None]) -> str:
    """Median (min–max) of the values given; steps print as whole numbers, losses with 3 decimals."""
    got = [x for x in xs if x is not None]
    if not got:
        return "–"

    def f(x: float) -> str:
        if all(isinstance(v, int) for v in got):
            return str(round(x))
        return fmt(float(x), 3 if max(got) < 10 else 1)

    if len(got) == 1:
        return f(got[0])
    return f"{f(median(got))} ({f(min(got))}–{f(max(got))})"


def run(
    quick: bool = False,
    results=None,
    seeds: tuple[int, ...] = SEEDS,
    modes: tuple[str, ...] = ("fp32", "bf16", "no-bf16"),
    nanogpt: str | Path | None = None,
    preset: str = PRESET,
    target: float = TARGET,
    full_schedule: bool = False,
    threads: int | None = None,
) -> dict:
    source = corpus_source()
    if quick and threads is None:
        threads = 1  # a smoke run on a busy machine: two spinning threads per op only wait for each other
    # Both trainers start torch with this many threads (torch reads OMP_NUM_THREADS at start-up).
    base_env = {"OMP_NUM_THREADS": str(threads)} if threads else {}
    if quick:
        seeds, target = seeds[:2], 3.5  # 2 seeds of 30 steps: checks the harness, not the figures
        overrides = dict(max_iters=30, eval_interval=10, eval_iters=2)
    else:
        overrides = {}
    report = Report(f"2. Time to whole-split val {target} (char-level Tiny Shakespeare)", quick=quick)
    report.add(f"Torch threads in every training process: {threads or 'torch default'} (ours and nanoGPT alike).")
    out: dict = {"ns": {}, "ours": {}, "nanogpt": {}}

    # Muon's Newton–Schulz precision on this CPU and on an emulated CPU without native bf16.
    rows = []
    for label, env in (("this CPU", {}), ("ONEDNN_MAX_CPU_ISA=AVX2", AVX2)):
        r = ns_check_in({**base_env, **env})
        out["ns"][label] = r
        rows.append([label, r["picks"], fmt(r["ms"]["fp32"], 2), fmt(r["ms"]["bf16"], 2)])
    report.add("**Muon's Newton–Schulz precision** (5 steps on one 128×512 matrix; the dtype `Muon` picks by itself):")
    report.add_table(["CPU", "Muon picks", "fp32 ms", "bf16 ms"], rows)

    problem = nanogpt_problem(Path(nanogpt) if nanogpt else None)
    if problem and not Path(source).is_file():
        problem = f"the corpus {source} is not a file nanoGPT's prepare.py can read"
    if problem:
        print(f"nanoGPT comparison skipped: {problem}", flush=True)

    with tempfile.TemporaryDirectory(prefix="tinygpt-bench-conv-") as tmp:
        root = Path(tmp)
        work = None if problem else prepare_nanogpt(Path(nanogpt), Path(source), root / "nanogpt")
        # nanoGPT's seed is fixed in its train.py: one run per CPU flavour, in turns with ours.
        nano_envs = {}
        for m in modes:
            nano_envs.setdefault("no-bf16" if m == "no-bf16" else "native", MODES[m][1])
        for i, seed in enumerate(seeds):
            for m in modes:
                precision, env, _ = MODES[m]
                cfg = dict(
                    preset=preset,
                    corpus=source,
                    seed=seed,
                    precision=precision,
                    overrides=overrides,
                    run_dir=str(root / f"{m}-{seed}"),
                    target=target,
                    stop_at_target=not full_schedule,
                )
                load = load_average()
                r = run_ours(cfg, {**base_env, **env})
                r["load"] = load
                out["ours"].setdefault(m, []).append(r)
                print(f"  ours {m} seed {seed}: {_hit_text(r)}, load {load}", flush=True)
            if work is not None and i == 0:
                for flavour, env in nano_envs.items():
                    load = load_average()
                    r = run_nanogpt(work, target, {**base_env, **env}, max_iters=30 if quick else None)
                    r["load"] = load
                    out["nanogpt"][flavour] = r
                    print(f"  nanoGPT ({flavour}): {_hit_text(r)}, load {load}", flush=True)

    rows = []
    for m in modes:
        rs = out["ours"][m]
        hits = [r["hit"] for r in rs]
        all_hit = all(h is not None for h in hits)
        nano = out["nanogpt"].get("no-bf16" if m == "no-bf16" else "native")
        nano_s = nano["hit"]["s"] if nano and nano["hit"] else None
        ours_s = median(h["s"] for h in hits) if all_hit else None
        rows.append(
            [
                f"{preset} {m} ({rs[0]['precision']})",
                len(rs),
                f"{sum(h is not None for h in hits)}/{len(rs)}",
                _spread([h["step"] if h else None for h in hits]),
                _spread([h["s"] if h else None for h in hits]),
                _spread([min((e["whole"] for e in r["evals"] if e["whole"] is not None), default=None) for r in rs]),
                _spread([r["imported_s"] for r in rs]),
                fmt(nano_s) if nano else "skipped",
                fmt(ours_s / nano_s, 2) if ours_s and nano_s else "–",
                _spread([r["load"] for r in rs]),
            ]
        )
    report.add(
        f"**Time to whole-split val {target}**: `{preset}` over seeds {', '.join(map(str, seeds))}, a fresh process "
        "per run, timed from its spawn to the end of the eval at the first step whose weights reach the target on "
        "the whole validation split (the whole-split evaluation's own seconds subtracted). Median (min–max) over "
        "seeds; 'reached' counts the seeds that reached it"
        + ("; runs stop there." if not full_schedule else "; runs go on to the end of their schedule.")
    )
    report.add_table(
        [
            "run",
            "seeds",
            "reached",
            "step",
            "seconds",
            "best whole-split val",
            "import s",
            "nanoGPT s",
            "÷ nanoGPT",
            "load",
        ],
        rows,
    )
    if out["nanogpt"]:
        lines = []
        for flavour, r in out["nanogpt"].items():
            lines.append(
                f"nanoGPT ({'ONEDNN_MAX_CPU_ISA=AVX2' if flavour == 'no-bf16' else 'this CPU'}, fp32, its fixed seed "
                f"1337): {_hit_text(r)} (its own estimate: 20 fresh random batches per eval, every "
                f"{r['evals'][1]['step'] - r['evals'][0]['step'] if len(r['evals']) > 1 else '?'} steps)."
            )
        report.add(
            "nanoGPT: its checkout's own `train.py` with the README's CPU recipe, on the same corpus and machine, "
            "in turns with ours. Its time runs from its spawn to the eval line that first reaches the target; its "
            "one-time `prepare.py` is not counted. bf16 rows compare our bf16 with nanoGPT's fp32 (it has no CPU "
            "bf16 path).\n\n" + "\n".join(f"- {x}" for x in lines)
        )
    else:
        report.add(f"nanoGPT comparison skipped: {problem}. No nanoGPT time is quoted.")
    report.emit(results)
    return out


def _hit_text(r: dict) -> str:
    h = r["hit"]
    if h is None:
        last = r["evals"][-1] if r["evals"] else None
        got = "–" if last is None else fmt(last["whole"] if last["whole"] is not None else last["estimate"], 4)
        return f"did not reach the target in {r['steps']} steps (last {got})"
    val = h["whole"] if h["whole"] is not None else h["estimate"]
    return f"reached {fmt(val, 4)} at step {h['step']} after {h['s']:.1f} s"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 seeds of 30 steps: checks the harness, not the figures")
    ap.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="comma-separated seeds (default %(default)s)")
    ap.add_argument("--modes", default="fp32,bf16,no-bf16", help=f"comma-separated, of: {', '.join(MODES)}")
    ap.add_argument("--nanogpt", type=Path, metavar="PATH", help="a nanoGPT checkout to run side by side")
    ap.add_argument("--preset", default=PRESET, help="our preset (default %(default)s)")
    ap.add_argument("--target", type=float, default=TARGET, help="whole-split val loss to reach (default %(default)s)")
    ap.add_argument(
        "--full-schedule", action="store_true", help="train on to the end instead of stopping at the target"
    )
    ap.add_argument("--threads", type=int, metavar="N", help="torch threads of every training process (both sides)")
    ap.add_argument("--results", type=Path, metavar="FILE", help="append the tables here instead")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--ns-check", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        sys.exit(child(json.loads(args.child)))
    if args.ns_check:
        print(MARK + json.dumps(ns_check()), flush=True)
        return
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    bad = [m for m in modes if m not in MODES]
    if bad:
        ap.error(f"unknown mode(s) {', '.join(bad)}; choose from {', '.join(MODES)}")
    run(
        args.quick,
        args.results,
        seeds=tuple(int(s) for s in args.seeds.split(",") if s.strip()),
        modes=modes,
        nanogpt=args.nanogpt,
        preset=args.preset,
        target=args.target,
        full_schedule=args.full_schedule,
        threads=args.threads,
    )


if __name__ == "__main__":
    main()
