"""Bench 1: training tokens/s of our step against transformers' GPT-2, same sizes and same batches.

For each preset (``baby``, ``shakespeare-char``) it times, in turns, our step in fp32 and in the
default speed mode (``auto``) and the transformers peer in fp32 and bf16 autocast, then reports
tokens/s, the ratio to the peer, and model FLOPs utilisation (nanoGPT's 6N + 12·L·C·T FLOPs per
token) against the fp32 and bf16 matmul peaks this script measures on the same machine.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from bench.common import Report, corpus_source, interleaved, matmul_peaks, median
from bench.steps import hf_step, our_step
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


def measure(preset: str, train_ids: torch.Tensor, vocab: int, rounds: int, quick: bool = False) -> list[dict]:
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
    steppers[1].name = f"ours auto ({steppers[1].precision})"
    times = interleaved({s.name: s.step for s in steppers}, rounds=rounds, warmup=2)
    return [
        dict(
            name=s.name,
            precision=s.precision,
            s_per_step=median(times[s.name]),
            tokens_per_step=s.tokens_per_step,
            flops_per_token=s.flops_per_token,
        )
        for s in steppers
    ]


def run(quick: bool = False, presets: tuple[str, ...] = ("baby", "shakespeare-char"), results=None) -> dict:
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
        rows = measure(preset, train_ids, vocab, rounds, quick)
        peer = next(r for r in rows if r["name"] == "transformers fp32")
        best_peer = min((r for r in rows if r["name"].startswith("transformers")), key=lambda r: r["s_per_step"])
        table = []
        for r in rows:
            tps = r["tokens_per_step"] / r["s_per_step"]
            gflops = tps * r["flops_per_token"] / 1e9
            r.update(
                tokens_per_s=tps,
                vs_peer_fp32=peer["s_per_step"] / r["s_per_step"],
                vs_best_peer=best_peer["s_per_step"] / r["s_per_step"],
                mfu_fp32=gflops / peaks["fp32"],
                mfu_bf16=gflops / peaks["bf16"],
            )
            table.append(
                [
                    r["name"],
                    f"{r['s_per_step'] * 1e3:.1f}",
                    f"{tps:,.0f}",
                    f"{r['vs_peer_fp32']:.2f}×",
                    f"{r['vs_best_peer']:.2f}×",
                    f"{100 * r['mfu_fp32']:.0f}%",
                    f"{100 * r['mfu_bf16']:.0f}%",
                ]
            )
        b, t = rows[0]["tokens_per_step"], get_preset(preset).model.get("block_size")
        report.add(f"**{preset}** (batch {b // t}, context {t}; median of {rounds} interleaved steps each)")
        report.add_table(
            ["step", "ms/step", "tokens/s", "vs HF fp32", "vs HF best", "MFU fp32 peak", "MFU bf16 peak"], table
        )
        out[preset] = rows
    report.emit(results)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few small steps: checks the script, not the speed")
    ap.add_argument("--preset", action="append", help="preset(s) to time (default: baby and shakespeare-char)")
    args = ap.parse_args(argv)
    run(args.quick, tuple(args.preset or ("baby", "shakespeare-char")))


if __name__ == "__main__":
    main()
