"""Where a training step's time goes: torch.profiler tables of our ``baby`` step in fp32 and the default mode.

The evidence behind RESULTS.md's explanations (which operators a missed target is spent in), so
a gap is explained by a measurement rather than a guess. The first table puts our fp32 ``baby``
step beside the peers' (transformers' GPT-2, and nanoGPT's model.py given a checkout), each
operator's self time summed into a few kinds, so a ratio between steps can be read kind by kind.
"""

from __future__ import annotations

import argparse
import dataclasses

from torch.profiler import ProfilerActivity, profile

from bench.common import Report
from bench.steps import Stepper, hf_step, nanogpt_step, our_step
from bench.throughput import load_ids
from tinygpt_core.config import get_preset

ROWS = 14
ROUNDS = 2  # side_by_side: rounds of every stepper in turns
# Operator kinds for the side-by-side table: the first kind whose name fragment an operator contains.
KINDS = (
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear")),
    ("attention", ("attention",)),
    ("activation", ("gelu", "relu", "tanh")),
    ("layer norm", ("layer_norm",)),
    ("loss, softmax", ("softmax", "nll_loss", "cross_entropy")),
    ("optimizer, clipping", ("adam", "optimizer", "foreach", "norm", "lerp", "clamp", "_fused")),
    ("copies, casts", ("copy_", "_to_copy", "contiguous", "clone", "aten::cat")),
    ("embedding", ("embedding", "index", "gather")),
)


def kind_of(op: str) -> str:
    low = op.lower()
    for kind, fragments in KINDS:
        if any(f in low for f in fragments):
            return kind
    return "other"


def profiled(stepper: Stepper, steps: int):
    """The profiler's per-operator averages over ``steps`` steps, after 3 unprofiled warm-up steps."""
    for _ in range(3):
        stepper.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            stepper.step()
    return prof.key_averages()


def step_kinds(stepper: Stepper, steps: int) -> dict[str, float]:
    """Milliseconds per step of self CPU time in each kind of operator (and "total"), under the profiler."""
    out: dict[str, float] = {}
    for e in profiled(stepper, steps):
        if e.key.startswith(("autograd::", "Optimizer.", "ProfilerStep")):
            continue  # wrappers: their time is the operators' inside them, except their own Python
        k = kind_of(e.key)
        out[k] = out.get(k, 0.0) + e.self_cpu_time_total / steps / 1e3
    out["total"] = sum(out.values())
    return out


def side_by_side(
    corpus: tuple, steps: int, nanogpt: str | None = None, quick: bool = False
) -> tuple[list[str], list[list[str]]]:
    """The fp32 ``baby`` step of ours and each peer, operator kinds in ms per step: (headers, rows), from
    the least disturbed of ROUNDS rounds taken in turns.

    ``corpus``: (train ids, vocabulary size), as ``load_ids`` gives them."""
    ids, vocab = corpus
    p = get_preset("baby")
    mcfg, tcfg = p.model_config(vocab_size=vocab), p.train_config(device="cpu")
    if quick:
        tcfg = dataclasses.replace(tcfg, batch_size=4)
    steppers = [our_step(mcfg, tcfg, ids, precision="fp32", name="ours"), hf_step(mcfg, tcfg, ids, precision="fp32")]
    if nanogpt:
        steppers.append(nanogpt_step(nanogpt, mcfg, tcfg, ids, precision="fp32"))
    names = [s.name.replace(" fp32", "") for s in steppers]
    # Two rounds in turns; each keeps its least disturbed round (the lowest total): a burst of a neighbour's
    # CPU (or of the previous section's clean-up) lands on one stepper's round, not on its figures.
    rounds = [{n: step_kinds(s, steps) for n, s in zip(names, steppers)} for _ in range(ROUNDS)]
    kinds = {n: min((r[n] for r in rounds), key=lambda k: k["total"]) for n in names}
    order = [k for k, _ in KINDS] + ["other", "total"]
    rows = [[k, *(f"{kinds[n].get(k, 0.0):.2f}" for n in names)] for k in order]
    return ["kind of operator (ms per step)", *names], rows


def profile_table(
    corpus: tuple,
    preset: str = "baby",
    precision: str = "auto",
    steps: int = 20,
    optimizer: str | None = None,
    batch_size: int | None = None,
) -> tuple[str, str, float]:
    """(resolved precision, profiler table, ms per step under the profiler); ``corpus`` as in side_by_side."""
    ids, vocab = corpus
    p = get_preset(preset)
    overrides = {k: v for k, v in dict(optimizer=optimizer, batch_size=batch_size).items() if v is not None}
    stepper = our_step(
        p.model_config(vocab_size=vocab), p.train_config(device="cpu", **overrides), ids, precision=precision
    )
    avg = profiled(stepper, steps)
    total_us = sum(e.self_cpu_time_total for e in avg)
    return stepper.precision, avg.table(sort_by="self_cpu_time_total", row_limit=ROWS), total_us / steps / 1e3


def decode_profile(new_tokens: int = 256) -> tuple[str, float]:
    """Profiler table of greedy KV-cache decoding on the baby sizes (the generation bench's first row)."""
    import torch

    from tinygpt_core.model import GPT
    from tinygpt_core.sampling import SamplingSettings, generate_ids

    torch.manual_seed(0)
    model = GPT(get_preset("baby").model_config(vocab_size=65, block_size=16 + new_tokens)).eval()
    ids = torch.randint(0, 65, (1, 16))
    greedy = SamplingSettings(strategy="greedy", max_new_tokens=new_tokens)
    generate_ids(model, ids, new_tokens, greedy)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        generate_ids(model, ids, new_tokens, greedy)
    avg = prof.key_averages()
    ms = sum(e.self_cpu_time_total for e in avg) / new_tokens / 1e3
    return avg.table(sort_by="self_cpu_time_total", row_limit=ROWS), ms


def run(quick: bool = False, results=None, nanogpt: str | None = None) -> dict:
    steps = 3 if quick else 20
    report = Report("Profile: where a training step's time goes (torch.profiler, self CPU time)", quick=quick)
    out = {}
    corpus = load_ids()  # once: building the tokenizer and ids is the same for every table
    headers, rows = side_by_side(corpus, steps, nanogpt, quick)
    report.add(
        f"**fp32 `baby` step, ours beside the peers** ({steps} profiled steps each, the same batches, fused "
        f"AdamW and clipping for all; {ROUNDS} rounds in turns, each column from its round with the lowest "
        "total; self CPU time of every operator summed by kind"
        + ("" if nanogpt else "; nanoGPT not run: give --nanogpt PATH")
        + ")"
    )
    report.add_table(headers, rows)
    out["side_by_side"] = rows
    for label, kw in [
        ("baby fp32 AdamW", dict(preset="baby", precision="fp32")),
        ("baby auto AdamW", dict(preset="baby", precision="auto")),
        ("baby-fast auto Muon", dict(preset="baby-fast", precision="auto")),
    ]:
        precision, text, ms = profile_table(corpus, steps=steps, **kw)
        report.add(
            f"**{label}** (resolved precision {precision}; {steps} steps, {ms:.1f} ms/step under the "
            "profiler)\n\n```\n" + text.strip() + "\n```"
        )
        out[label] = ms
    text, ms = decode_profile(new_tokens=32 if quick else 256)
    report.add(
        f"**Generation, baby sizes, KV cache, one token at a time** ({ms:.2f} ms per token under the "
        "profiler)\n\n```\n" + text.strip() + "\n```"
    )
    out["decode"] = ms
    report.emit(results)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--nanogpt", metavar="PATH", help="a nanoGPT checkout: profile its model.py's step too")
    args = ap.parse_args(argv)
    run(args.quick, nanogpt=args.nanogpt)


if __name__ == "__main__":
    main()
