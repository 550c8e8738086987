"""Bench 1: training tokens/s of our step against transformers' GPT-2 (and nanoGPT's model), same sizes and batches.

For each preset (``baby``, ``shakespeare-char``) it times, in turns, our step in fp32 and in the
default speed mode (``auto``), the transformers peer in fp32 and bf16 autocast, and, given a
nanoGPT checkout (``--nanogpt PATH`` or $BENCH_NANOGPT), nanoGPT's own ``model.py`` in both too;
outside ``--quick`` also our fp32 step under ``torch.compile``, whose compile time is weighed against
the steps the preset runs (does it pay back inside a run?). It reports tokens/s, the ratio to each
peer **in the same precision** (fp32 against fp32, bf16 against bf16), and model FLOPs utilisation
(nanoGPT's 6N + 12·L·C·T FLOPs per token) against the fp32 and bf16 matmul peaks this script
measures on the same machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from bench.common import Report, corpus_source, interleaved, matmul_peaks, median
from bench.steps import hf_step, nanogpt_step, our_step
from tinygpt_core.config import get_preset
from tinygpt_core.data import load_corpus, split_ids
from tinygpt_core.tokenizers import train_tokenizer

ROUNDS = {"baby": 20, "shakespeare-char": 3}


def load_ids(source: str | None = None) -> tuple[torch.Tensor, int]:
    """Train split token ids of the corpus (char tokenizer) and the vocabulary size."""
    corpus = load_corpus(source or corpus_source())
    tok = train_tokenizer("char", corpus.text)
    ids = torch.tensor(tok.encode(corpus.text), dtype=torch.long)
    return split_ids(ids, 0.1)[0], tok.vocab_size


def measure(
    preset: str, train_ids: torch.Tensor, vocab: int, rounds: int, quick: bool = False, nanogpt: str | None = None
) -> list[dict]:
    """Median seconds per step for each contender of ``preset``, measured A B C D A B C D ..."""
    p = get_preset(preset)
    model_cfg = p.model_config(vocab_size=vocab)
    train_cfg = p.train_config(device="cpu" if not torch.cuda.is_available() else "auto")
    if quick:  # seconds, not minutes: a smaller batch of the same model
        train_cfg = dataclasses.replace(train_cfg, batch_size=min(train_cfg.batch_size, 4))
    steppers = [
        our_step(model_cfg, train_cfg, train_ids, precision="fp32", name="ours fp32"),
        our_step(model_cfg, train_cfg, train_ids, precision="auto"),
        hf_step(model_cfg, train_cfg, train_ids, precision="fp32"),
        hf_step(model_cfg, train_cfg, train_ids, precision="bf16"),
    ]
    if nanogpt:
        steppers += [nanogpt_step(nanogpt, model_cfg, train_cfg, train_ids, precision=p) for p in ("fp32", "bf16")]
    steppers[1].name = f"ours auto ({steppers[1].precision})"
    compile_s: dict[str, float] = {}
    if not quick:  # compiling takes tens of seconds: the full run only
        steppers[1:1] = _compiled_steps(model_cfg, train_cfg, train_ids, compile_s)
    times = interleaved({s.name: s.step for s in steppers}, rounds=rounds, warmup=2)
    return [
        dict(
            name=s.name + (" (fell back: " + "; ".join(s.notes) + ")" if s.notes else ""),
            precision=s.precision,
            s_per_step=median(times[s.name]),
            tokens_per_step=s.tokens_per_step,
            flops_per_token=s.flops_per_token,
            first_step_s=compile_s.get(s.name),
        )
        for s in steppers
    ]


def _compiled_steps(model_cfg, train_cfg, train_ids, first_step_s: dict[str, float]) -> list:
    """Our fp32 step under torch.compile, compiled twice: into an empty compile cache (what a machine's
    first compiled run pays) and again after ``torch.compiler.reset()`` from that cache (a run of the
    same shapes later). Each first step's seconds, the compile, go into ``first_step_s`` by name."""
    cache = tempfile.mkdtemp(prefix="tinygpt-inductor-")
    before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # inductor reads it at each compile
    steppers = []
    try:
        for name in ("ours fp32, torch.compile, empty cache", "ours fp32, torch.compile, cached"):
            torch.compiler.reset()  # the process forgets what it compiled; the cache on disk stays
            stepper = our_step(model_cfg, train_cfg, train_ids, precision="fp32", name=name, compile_mode="default")
            t0 = time.perf_counter()
            stepper.step()  # forward and backward graphs compile here
            first_step_s[name] = time.perf_counter() - t0
            steppers.append(stepper)
    finally:
        if before is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = before
        shutil.rmtree(cache, ignore_errors=True)  # the compiled code is already loaded
    return steppers


def compile_payback(rows: list[dict], max_iters: int) -> str | None:
    """Sentences weighing each compiled step's first-step cost against what it saves over the preset's steps."""
    eager = next((r for r in rows if r["name"] == "ours fp32"), None)
    compiled = [r for r in rows if r.get("first_step_s") is not None]
    if eager is None or not compiled:
        return None
    e_ms = eager["s_per_step"] * 1e3
    said = []
    for r in compiled:
        c_ms, first = r["s_per_step"] * 1e3, r["first_step_s"]
        text = f"{r['name']}: first step {first:.1f} s (the compile), then {c_ms:.1f} against {e_ms:.1f} ms eager"
        if c_ms >= e_ms:
            said.append(text + ", so it never pays back")
            continue
        payback = first / ((e_ms - c_ms) / 1e3)
        verdict = "inside" if payback < max_iters else "not inside"
        said.append(text + f"; it pays back after {payback:,.0f} steps, {verdict} the preset's {max_iters:,}")
    return "; ".join(said) + "."


def same_precision(rows: list[dict], label: str, r: dict) -> str:
    """r's speed-up over the peer named ``label`` in r's own precision (stored in r as "vs <label>")."""
    peer = next((p for p in rows if p["name"].startswith(label) and p["precision"] == r["precision"]), None)
    if peer is None or r["name"].startswith(label):
        return "–"
    r[f"vs {label}"] = peer["s_per_step"] / r["s_per_step"]
    return f"{r[f'vs {label}']:.2f}×"


def run(
    quick: bool = False,
    presets: tuple[str, ...] = ("baby", "shakespeare-char"),
    results=None,
    nanogpt: str | None = None,
) -> dict:
    nanogpt = nanogpt or os.environ.get("BENCH_NANOGPT")
    train_ids, vocab = load_ids()
    peaks = matmul_peaks(n=1024 if quick else 2048, reps=3 if quick else 7)
    report = Report("1. Training throughput: ours vs transformers GPT2LMHeadModel", quick=quick)
    report.add(
        f"Matmul peaks measured here: fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s "
        "(2048² matrices). MFU uses nanoGPT's 6N + 12·L·C·T training FLOPs per token."
    )
    out: dict = {"peaks": peaks}
    for preset in presets:
        rounds = 3 if quick else ROUNDS.get(preset, 5)
        rows = measure(preset, train_ids, vocab, rounds, quick, nanogpt)

        table = []
        for r in rows:
            tps = r["tokens_per_step"] / r["s_per_step"]
            gflops = tps * r["flops_per_token"] / 1e9
            r.update(tokens_per_s=tps, mfu_fp32=gflops / peaks["fp32"], mfu_bf16=gflops / peaks["bf16"])
            table.append(
                [
                    r["name"],
                    f"{r['s_per_step'] * 1e3:.1f}",
                    f"{tps:,.0f}",
                    same_precision(rows, "transformers", r),
                    same_precision(rows, "nanoGPT", r) if nanogpt else "not run",
                    f"{100 * r['mfu_fp32']:.0f}%",
                    f"{100 * r['mfu_bf16']:.0f}%",
                ]
            )
        b, t = rows[0]["tokens_per_step"], get_preset(preset).model.get("block_size")
        report.add(
            f"**{preset}** (batch {b // t}, context {t}; median of {rounds} interleaved steps each; "
            f"torch threads {torch.get_num_threads()})"
            + ("" if nanogpt else "; nanoGPT not run (give --nanogpt PATH or $BENCH_NANOGPT)")
        )
        report.add_table(
            [
                "step",
                "ms/step",
                "tokens/s",
                "vs transformers, same precision",
                "vs nanoGPT, same precision",
                "MFU fp32 peak",
                "MFU bf16 peak",
            ],
            table,
        )
        payback = compile_payback(rows, get_preset(preset).train_config().max_iters)
        if payback:
            report.add(payback)
        out[preset] = rows
    report.emit(results)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few small steps: checks the script, not the speed")
    ap.add_argument("--preset", action="append", help="preset(s) to time (default: baby and shakespeare-char)")
    ap.add_argument("--nanogpt", metavar="PATH", help="a nanoGPT checkout: also time its model.py (or $BENCH_NANOGPT)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--results", type=Path, help="append the tables here instead of bench/RESULTS.md")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    run(args.quick, tuple(args.preset or ("baby", "shakespeare-char")), args.results, args.nanogpt)


if __name__ == "__main__":
    main()
