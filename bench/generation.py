"""Bench 3: generation tokens/s for 256 new tokens, with our KV cache, without it, and transformers' generate.

Greedy decoding from a prompt taken from the corpus, on the ``baby`` model sizes with a context
long enough for the whole continuation (prompt + 256 tokens: with a 64-token context, a 256-token
continuation would slide its window and every step would have to recompute, cache or not, since
learned positions shift). The transformers peer is our model exported with
``tinygpt_core.export`` and loaded by ``GPT2LMHeadModel.from_pretrained``; both decode the same
prompt and the tokens they pick are compared. Weights are the seeded initialisation: decoding
costs the same whatever the weights.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings

import torch

from bench.common import Report, corpus_source, interleaved, median
from tinygpt_core.config import get_preset
from tinygpt_core.data import load_corpus
from tinygpt_core.export import export_model
from tinygpt_core.model import GPT
from tinygpt_core.sampling import SamplingSettings, generate, generate_ids
from tinygpt_core.tokenizers import train_tokenizer

NEW_TOKENS = 256
PROMPT_CHARS = 16


def build(preset: str, text: str, new_tokens: int) -> tuple[GPT, object, str]:
    tok = train_tokenizer("char", text)
    prompt = text[:PROMPT_CHARS]
    block = max(get_preset(preset).model.get("block_size", 64), PROMPT_CHARS + new_tokens)
    torch.manual_seed(0)
    model = GPT(get_preset(preset).model_config(vocab_size=tok.vocab_size, block_size=block)).eval()
    return model, tok, prompt


def run(quick: bool = False, results=None, presets: tuple[str, ...] = ("baby", "shakespeare-char")) -> dict:
    from transformers import GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    text = load_corpus(corpus_source()).text
    new_tokens = 32 if quick else NEW_TOKENS
    rounds = 2 if quick else 5
    if quick:
        presets = presets[:1]
    report = Report(f"3. Generation: {new_tokens} new tokens, greedy, batch 1", quick=quick)
    out: dict = {}
    for preset in presets:
        model, tok, prompt = build(preset, text, new_tokens)
        ids = torch.tensor([tok.encode(prompt)])
        greedy = SamplingSettings(strategy="greedy", max_new_tokens=new_tokens)
        with tempfile.TemporaryDirectory(prefix="tinygpt-bench-") as tmp:
            export_model(model, tmp, tok)
            hf = GPT2LMHeadModel.from_pretrained(tmp, dtype=torch.float32).eval()
        outputs: dict[str, torch.Tensor] = {}

        def ours(cache: bool):
            def f():
                outputs[f"ours {cache}"] = generate_ids(model, ids, new_tokens, greedy, use_cache=cache)

            return f

        def app_path():
            generate(model, tok, prompt, greedy, use_cache=True)

        def theirs(cache: bool):
            def f():
                with torch.no_grad(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    outputs[f"hf {cache}"] = hf.generate(
                        ids,
                        attention_mask=torch.ones_like(ids),
                        max_new_tokens=new_tokens,
                        min_new_tokens=new_tokens,
                        do_sample=False,
                        use_cache=cache,
                        pad_token_id=0,
                    )

            return f

        fns = {
            "ours, KV cache": ours(True),
            "ours, no cache (recompute context)": ours(False),
            "ours, KV cache, app path (records top-10 per step)": app_path,
            "transformers generate, cache": theirs(True),
            "transformers generate, no cache": theirs(False),
        }
        times = interleaved(fns, rounds=rounds, warmup=1)
        tps = {k: new_tokens / median(v) for k, v in times.items()}
        same = all(torch.equal(outputs["ours True"], o) for o in outputs.values())
        cache_speedup = tps["ours, KV cache"] / tps["ours, no cache (recompute context)"]
        vs_hf = tps["ours, KV cache"] / tps["transformers generate, cache"]
        cfg = model.config
        report.add(
            f"**{preset}** sizes ({cfg.n_layer} layers, {cfg.n_embd} dims), context {cfg.block_size}, "
            f"prompt {ids.size(1)} tokens; median of {rounds} interleaved runs. "
            f"All five decode the same tokens: {'yes' if same else 'NO'}."
        )
        report.add_table(
            ["decoder", "ms total", "tokens/s"], [[k, f"{median(times[k]) * 1e3:.0f}", f"{tps[k]:,.0f}"] for k in fns]
        )
        report.add(
            f"KV cache vs recompute: {cache_speedup:.1f}× (target ≥ 5×); ours vs transformers' cached "
            f"generate: {vs_hf:.2f}× (target > 1×)."
        )
        out[preset] = dict(tokens_per_s=tps, same_tokens=same, cache_speedup=cache_speedup, vs_hf=vs_hf)
    report.emit(results)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="32 tokens, 2 rounds: checks the script")
    ap.add_argument("--preset", action="append", help="model sizes to use (default: baby and shakespeare-char)")
    args = ap.parse_args(argv)
    run(args.quick, presets=tuple(args.preset or ("baby", "shakespeare-char")))


if __name__ == "__main__":
    main()
