"""Bench 3: per-token decode latency on a preset's own context: KV cache vs recompute vs transformers' generate.

Greedy decoding, batch 1, from a 16-token prompt taken from the corpus, on the ``baby`` model
sizes with the preset's own context (64 tokens), in two cases:

- **fits**: 48 new tokens (16 + 48 = 64: the window never slides);
- **slides**: 400 new tokens, far past the context, decoded with the exact window (the last 64
  tokens at every step: ``context_slide=1``, the default) and with a window that jumps half the
  context at once (``context_slide=32``: the cache is rebuilt once every 32 tokens).

Every decoder of a case runs in turns in one process (A B C A B C ...), and the medians are
reported as milliseconds per new token (the whole call over the new tokens: the prompt's forward
included), both wall time and the process's CPU time (CPU time is what a busy shared machine
distorts least). ``--before PATH`` adds the decoding code of another checkout (e.g. ``/work/main``:
"today's" decoder) in the same run, with the same weights. The transformers peer is the model
exported with ``tinygpt_core.export`` and loaded by ``GPT2LMHeadModel.from_pretrained``; GPT-2 has no
sliding window, so past its 64 positions ``generate`` is restarted on the window our policy sees
(once per token for the exact window, once per slide for slide 32). Every decoder of one policy
must pick the same tokens, and the tables say whether they did. Weights are the seeded
initialisation: decoding costs the same whatever the weights.
Our cached decoder keeps its transposed weight copies on the model from one call to the next
(``tinygpt_core/decode_step.py``), as repeated decodes of one loaded model in the app reuse them;
the row "weights just written" rewrites a weight in place before each call, so they are made
again, as for the first decode after a training step.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import types
import warnings
from pathlib import Path

import torch

from bench.common import Report, corpus_source, interleaved, median
from tinygpt_core.config import get_preset
from tinygpt_core.data import load_corpus
from tinygpt_core.export import export_model
from tinygpt_core.model import GPT
from tinygpt_core.sampling import SamplingSettings, context_length, generate_ids
from tinygpt_core.tokenizers import train_tokenizer

PROMPT_TOKENS = 16
CASES = {"fits": 48, "slides": 400}  # new tokens after the prompt


def load_before(path: str | Path):
    """Another checkout's ``tinygpt_core`` as the package ``tinygpt_before`` (its __init__ is not run)."""
    pkg_dir = Path(path).resolve() / "tinygpt_core"
    if not (pkg_dir / "sampling.py").is_file():
        raise SystemExit(f"--before {path}: no tinygpt_core/sampling.py there; give the root of a checkout.")
    pkg = types.ModuleType("tinygpt_before")
    pkg.__path__ = [str(pkg_dir)]
    sys.modules["tinygpt_before"] = pkg
    return types.SimpleNamespace(
        model=importlib.import_module("tinygpt_before.model"),
        sampling=importlib.import_module("tinygpt_before.sampling"),
        config=importlib.import_module("tinygpt_before.config"),
    )


def hf_windowed(hf, ids: torch.Tensor, new_tokens: int, block: int, slide: int) -> torch.Tensor:
    """transformers' ``generate`` under our window policy: restarted on the visible window whenever it slides."""
    seq, origin = ids, max(0, ids.size(1) - block)
    while seq.size(1) < ids.size(1) + new_tokens:
        L = context_length(seq.size(1), block, slide, origin)  # the window the next token is predicted from
        # it grows by one token per step, without sliding, for block - L + 1 steps
        n = min(block - L + 1, ids.size(1) + new_tokens - seq.size(1))
        out = _hf_generate(hf, seq[:, -L:], n, cache=True)
        seq = torch.cat([seq, out[:, L:]], dim=1)
    return seq


def _hf_generate(hf, ids: torch.Tensor, n: int, cache: bool) -> torch.Tensor:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            use_cache=cache,
            pad_token_id=0,
        )


def decoders(model, hf, before, ids: torch.Tensor, new_tokens: int, slides: bool) -> dict[str, tuple]:
    """name -> (policy, fn returning the decoded ids) for one case; ``before`` is (package, its model) or None."""
    block = model.config.block_size
    half = block // 2

    def ours(cache: bool, slide: int = 1):
        s = SamplingSettings(strategy="greedy", max_new_tokens=new_tokens, context_slide=slide)
        return lambda: generate_ids(model, ids, new_tokens, s, use_cache=cache)

    def cold(fn):
        """The same call right after the weights were written (as after a training step): the decode
        step kept on the model from the call before is stale, and the weight copies are made again."""

        def call():
            with torch.no_grad():
                model.wte.weight.add_(0.0)  # same values, a new version: nothing kept may be reused
            return fn()

        return call

    exact = "exact window" if slides else "inside the context"
    out = {
        "ours, KV cache": (exact, ours(True)),
        "ours, KV cache, weights just written": (exact, cold(ours(True))),
        "ours, recompute": (exact, ours(False)),
    }
    if slides:
        out[f"ours, KV cache, slide {half}"] = (f"slide {half}", ours(True, half))
        out[f"ours, recompute, slide {half}"] = (f"slide {half}", ours(False, half))
    if before is not None:
        pkg, bmodel = before
        settings = pkg.sampling.SamplingSettings(strategy="greedy", max_new_tokens=new_tokens)
        for cache in (True, False):
            fn = lambda c=cache: pkg.sampling.generate_ids(bmodel, ids, new_tokens, settings, use_cache=c)  # noqa: E731
            out[f"before, {'KV cache' if cache else 'recompute'}"] = (exact, fn)
    if slides:
        out["transformers generate, restarted per token"] = (exact, lambda: hf_windowed(hf, ids, new_tokens, block, 1))
        out[f"transformers generate, restarted per {half}"] = (
            f"slide {half}",
            lambda: hf_windowed(hf, ids, new_tokens, block, half),
        )
    else:
        out["transformers generate, cache"] = (exact, lambda: _hf_generate(hf, ids, new_tokens, True))
        out["transformers generate, no cache"] = (exact, lambda: _hf_generate(hf, ids, new_tokens, False))
    return out


def run(
    quick: bool = False,
    results=None,
    presets: tuple[str, ...] = ("baby",),
    before: str | None = None,
    rounds: int | None = None,
) -> dict:
    from transformers import GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    text = load_corpus(corpus_source()).text
    tok = train_tokenizer("char", text)
    ids = torch.tensor([tok.encode(text[:PROMPT_TOKENS])])
    cases = {"fits": 8, "slides": 80} if quick else CASES
    rounds = rounds or (1 if quick else 9)
    before_pkg = load_before(before) if before else None
    report = Report("3. Generation: per-token decode latency on the preset's own context, greedy", quick=quick)
    report.add(
        f"Prompt {PROMPT_TOKENS} tokens; ms per new token = the whole call / new tokens (prompt forward included), "
        f"median of {rounds} interleaved rounds; CPU = the process's CPU time. "
        + (f"`before` = the decoding code of `{before}`, same weights." if before else "No `--before` checkout given.")
    )
    out: dict = {}
    for preset in presets:
        torch.manual_seed(0)
        model = GPT(get_preset(preset).model_config(vocab_size=tok.vocab_size)).eval()
        block = model.config.block_size
        with tempfile.TemporaryDirectory(prefix="tinygpt-bench-") as tmp:
            export_model(model, tmp, tok)
            hf = GPT2LMHeadModel.from_pretrained(tmp, dtype=torch.float32).eval()
        bpair = None
        if before_pkg is not None:
            bcfg = before_pkg.config.get_preset(preset).model_config(vocab_size=tok.vocab_size)
            bmodel = before_pkg.model.GPT(bcfg).eval()
            bmodel.load_state_dict(model.state_dict())
            bpair = (before_pkg, bmodel)
        for case, new_tokens in cases.items():
            fns = decoders(model, hf, bpair, ids, new_tokens, slides=PROMPT_TOKENS + new_tokens > block)
            outputs: dict[str, torch.Tensor] = {}

            def keep(name, fn):
                return lambda: outputs.__setitem__(name, fn())

            cpu: dict[str, list[float]] = {}
            wall = interleaved({k: keep(k, fn) for k, (_, fn) in fns.items()}, rounds=rounds, warmup=1, cpu=cpu)
            ms = {k: 1e3 * median(v) / new_tokens for k, v in wall.items()}
            cpu_ms = {k: 1e3 * median(v) / new_tokens for k, v in cpu.items()}
            policies = {p for p, _ in fns.values()}
            same = {
                p: all(torch.equal(outputs[k][:, : ids.size(1) + new_tokens], outputs[first]) for k in names)
                for p in policies
                for names in [[k for k, (q, _) in fns.items() if q == p]]
                for first in names[:1]
            }
            rows = [
                [k, pol, f"{ms[k]:.2f}", f"{cpu_ms[k]:.2f}", f"{1e3 / ms[k]:,.0f}", "yes" if same[pol] else "NO"]
                for k, (pol, _) in fns.items()
            ]
            cfg = model.config
            report.add(
                f"**{preset}** sizes ({cfg.n_layer} layers, {cfg.n_embd} dims), context {block}, "
                f"**{case}**: {PROMPT_TOKENS} + {new_tokens} tokens"
            )
            report.add_table(["decoder", "window", "ms/token", "CPU ms/token", "tokens/s", "same tokens"], rows)
            res = {"ms_per_token": ms, "cpu_ms_per_token": cpu_ms, "same_tokens": same}
            notes = [f"KV cache vs recompute: {ms['ours, recompute'] / ms['ours, KV cache']:.2f}×"]
            if "transformers generate, cache" in ms:
                hf_ratio = ms["transformers generate, cache"] / ms["ours, KV cache"]
                notes.append(f"vs transformers' cached generate: {hf_ratio:.2f}×")
            if bpair is not None:
                for k in [k for k in ms if k.startswith("ours, KV cache")]:
                    speedup = ms["before, KV cache"] / ms[k]
                    cpu_speedup = cpu_ms["before, KV cache"] / cpu_ms[k]
                    res[f"vs before: {k}"] = speedup
                    notes.append(f"{k} vs before's KV cache: {speedup:.2f}× wall, {cpu_speedup:.2f}× CPU (target ≥ 2×)")
            all_same = "yes" if all(same.values()) else "NO"
            report.add(
                f"All decoders of one window policy decode the same tokens: {all_same}. " + "; ".join(notes) + "."
            )
            out[f"{preset} {case}"] = res
    report.emit(results)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="8 and 80 new tokens, 1 round: checks the script")
    ap.add_argument("--preset", action="append", help="model sizes and context to use (default: baby)")
    ap.add_argument("--before", metavar="PATH", help="also time the decoder of the checkout at PATH (e.g. main's)")
    ap.add_argument(
        "--rounds",
        type=int,
        help="interleaved rounds (default 9: a shared machine's noise is as large as the differences)",
    )
    ap.add_argument("--results", type=Path, help="append the tables here instead of bench/RESULTS.md")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    run(args.quick, args.results, tuple(args.preset or ("baby",)), args.before, args.rounds)


if __name__ == "__main__":
    main()
