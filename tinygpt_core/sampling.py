"""Decoding: turn a model's next-token logits into text.

One module owns every way the lab picks tokens:

- logits processors: temperature, top-k, top-p, min-p (``process_logits``) and the repetition
  penalty, each with the semantics of the Hugging Face transformers processor of the same name;
- strategies: greedy, sampling (reproducible with a seed) and beam search;
- a KV cache, so each new token costs one token's forward pass instead of the whole context's;
- per-step records (``StepInfo``) and summary statistics (``text_stats``) for the app;
- ``next_token_distribution``: what each setting keeps and cuts of one distribution.

Context length. A model sees at most ``block_size`` tokens; ``context_length`` says which of the
last tokens it sees, and the cached and uncached paths both follow it, so they pick the same tokens.
With the cache, tokens are appended one at a time (in place, ``model.KVCache``) until the context
is full. Then the window must slide, and a slide cannot reuse the cache: with learned (or
sinusoidal) absolute positions every kept token moves to a new position, and even without
positions every key and value past the first layer was computed while attending to the token
that dropped out. ``SamplingSettings.context_slide`` picks the trade-off:

- 1 (the default, exact): the model always sees the last ``block_size`` tokens. Past the context
  every step is a full forward of block_size tokens; no cache is built for it, since the next
  token would slide it again.
- s > 1: the window jumps ahead s tokens at a time, so the model sees between block_size - s + 1
  and block_size tokens, and the cache is rebuilt once every s tokens (one forward of
  block_size - s + 1 tokens) and extended one token at a time in between. ``block_size // 2``
  (llama.cpp's "context shift" keeps half of the context the same way) makes a long generation
  cost about what a generation inside the context costs; bench/generation.py measures both.

Empty prompts. A model needs at least one token to condition on; an empty prompt starts from the
encoding of a newline when the tokenizer has one (a natural "start of text" in most corpora), and
from token id 0 otherwise. That start token is not part of the returned text.

One subject, decoding: the logits processors, the strategies (greedy, sampling, beam) and the KV
cache loop; hence past 400 lines.
"""

from __future__ import annotations

import contextlib
import functools
import math
import operator
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .decode_step import DecodeStep
from .errors import ConfigError, TokenizerError
from .model import KVCache

STRATEGIES = ("greedy", "sample", "beam")
MAX_NEW_TOKENS = 100_000  # a bound on one request: a typo of extra zeros must not tie up a shared server
TOP_N = 10  # candidates recorded per step in StepInfo.top


# ---------------------------------------------------------------------------------------------
# Logits processors


# Below these, logits / temperature (or / penalty) overflow float32 to inf and the softmax turns to
# NaN (found by the property tests: 5e-324 passed "> 0" and crashed torch.multinomial).
MIN_TEMPERATURE = 1e-3
# Above this every token is all but equally likely: a larger T is a typo, not an experiment. The one bound
# the CLI, the app's widgets and their help share (issue 12: the app once capped at 5 while the CLI took 100).
MAX_TEMPERATURE = 100.0
REPETITION_PENALTY_RANGE = (1e-2, 1e2)


def _check_filters(temperature: Any, top_k: Any, top_p: Any, min_p: Any) -> None:
    """Raise ConfigError for any sampling setting out of range (messages name the fix)."""
    if not _is_number(temperature) or not math.isfinite(temperature) or temperature <= 0:
        raise ConfigError(
            f"temperature must be a number > 0, got {temperature!r} (use greedy for temperature 0: "
            "it always picks the most likely token)."
        )
    if temperature < MIN_TEMPERATURE:
        raise ConfigError(
            f"temperature must be at least {MIN_TEMPERATURE:g}, got {temperature!r}: smaller values overflow. "
            "Use greedy, which is what temperature 0 means."
        )
    if temperature > MAX_TEMPERATURE:
        raise ConfigError(
            f"temperature must be at most {MAX_TEMPERATURE:g}, got {temperature!r}: beyond that every token is "
            "about equally likely. Use a smaller temperature (above 1 flattens, below 1 sharpens)."
        )
    if top_k is not None:
        try:
            k = operator.index(top_k)
        except TypeError:
            k = None
        if k is None or isinstance(top_k, bool) or k < 1:
            raise ConfigError(f"top_k must be a whole number >= 1 (or None to keep every token), got {top_k!r}.")
    if top_p is not None and (not _is_number(top_p) or not 0 < top_p <= 1):
        raise ConfigError(f"top_p must be in (0, 1] (1 keeps every token), got {top_p!r}.")
    if min_p is not None and (not _is_number(min_p) or not 0 <= min_p <= 1):
        raise ConfigError(f"min_p must be in [0, 1] (0 keeps every token), got {min_p!r}.")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def process_logits(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
) -> torch.Tensor:
    """Apply temperature, then top-k, then top-p, then min-p; removed entries become -inf.

    ``logits`` is (V,), (B, V) or (B, T, V); the result has the same shape and is a new tensor.
    Each step has the semantics of the transformers warper of that name with min_tokens_to_keep=1:

    - temperature: logits / temperature;
    - top-k: remove every token whose logit is below the k-th largest (ties with the k-th are all
      kept, so more than k tokens can survive); k >= V keeps everything;
    - top-p: sort ascending, remove the tokens whose cumulative probability is <= 1 - top_p (the
      least likely tail holding at most 1 - top_p of the mass); the most likely token always stays;
      top_p = 1.0 keeps everything (transformers' generate skips the warper at 1.0 too);
    - min-p: remove tokens whose probability is below min_p × the top token's probability;
      the top token always stays; min_p = 0 keeps everything.

    Probabilities are recomputed from the already-filtered logits at each step, as chaining the
    transformers warpers does.
    """
    _check_filters(temperature, top_k, top_p, min_p)
    logits = torch.as_tensor(logits)
    if logits.dim() == 0:
        raise ConfigError("process_logits needs logits with a vocabulary dimension, got a scalar.")
    if not logits.is_floating_point():
        logits = logits.float()
    shape = logits.shape
    x = logits.reshape(-1, shape[-1])  # (N, V): every distribution as one row
    if temperature != 1.0:
        x = x / temperature
    if top_k is not None:
        x = _top_k(x, operator.index(top_k))
    if top_p is not None and top_p < 1.0:
        x = _top_p(x, float(top_p))
    if min_p is not None:
        x = _min_p(x, float(min_p))
    if x.data_ptr() == logits.data_ptr():
        x = x.clone()  # nothing applied: still never hand back the caller's tensor
    return x.reshape(shape)


def _top_k(x: torch.Tensor, k: int) -> torch.Tensor:  # x: (N, V)
    k = min(k, x.size(-1))
    kth = torch.topk(x, k, dim=-1).values[:, -1:]  # (N, 1) the k-th largest logit
    return x.masked_fill(x < kth, float("-inf"))


def _top_p(x: torch.Tensor, p: float) -> torch.Tensor:  # x: (N, V)
    # Ascending order: the cumulative sum then measures the mass of the least likely tail, which
    # is exactly what gets cut. Computing it this way (not 1 - a descending cumsum) keeps rounding
    # at the boundary identical to transformers.
    sorted_x, order = torch.sort(x, dim=-1, descending=False)
    tail_mass = sorted_x.softmax(dim=-1).cumsum(dim=-1)  # (N, V)
    cut_sorted = tail_mass <= 1 - p
    cut_sorted[:, -1] = False  # the most likely token always survives
    cut = torch.zeros_like(cut_sorted).scatter(-1, order, cut_sorted)  # back to vocabulary order
    return x.masked_fill(cut, float("-inf"))


def _min_p(x: torch.Tensor, m: float) -> torch.Tensor:  # x: (N, V)
    probs = x.softmax(dim=-1)
    cut = probs < m * probs.amax(dim=-1, keepdim=True)
    cut = cut.scatter(-1, probs.argmax(dim=-1, keepdim=True), False)  # the top token always survives
    return x.masked_fill(cut, float("-inf"))


def _check_repetition_penalty(penalty: Any) -> None:
    low, high = REPETITION_PENALTY_RANGE
    if not _is_number(penalty) or not math.isfinite(penalty) or penalty <= 0:
        raise ConfigError(
            f"repetition_penalty must be a number > 0 (1 = no penalty, 1.1-1.3 is typical), got {penalty!r}."
        )
    if not low <= penalty <= high:
        raise ConfigError(
            f"repetition_penalty must be between {low:g} and {high:g} (1 = no penalty, 1.1-1.3 is typical), "
            f"got {penalty!r}: more extreme values overflow."
        )


def apply_repetition_penalty(logits: torch.Tensor, prev_ids: Any, penalty: float) -> torch.Tensor:
    """Penalise every token that already occurs in ``prev_ids`` (CTRL / transformers semantics).

    A seen token's logit is divided by ``penalty`` when positive and multiplied by it when negative,
    so penalty > 1 always makes it less likely; each token is penalised once however often it
    occurred. ``logits`` is (V,) or (B, V); ``prev_ids`` is (T,) (for every row) or (B, T).
    """
    _check_repetition_penalty(penalty)
    logits = torch.as_tensor(logits)
    ids = torch.as_tensor(prev_ids, dtype=torch.long, device=logits.device)
    if penalty == 1.0 or ids.numel() == 0:
        return logits.clone()
    x = logits.reshape(-1, logits.size(-1))  # (B, V)
    ids = ids.reshape(1, -1).expand(x.size(0), -1) if ids.dim() == 1 else ids.reshape(x.size(0), -1)  # (B, T)
    seen = x.gather(1, ids)  # (B, T) repeated ids just read the same logit twice
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return x.scatter(1, ids, seen).reshape(logits.shape)


# ---------------------------------------------------------------------------------------------
# Settings and results


@dataclass
class SamplingSettings:
    strategy: str = "sample"  # greedy | sample | beam
    temperature: float = 1.0  # sample only: < 1 sharpens, > 1 flattens the distribution
    top_k: int | None = None  # sample only: keep the k most likely tokens
    top_p: float | None = None  # sample only: keep the smallest set holding this much probability
    min_p: float | None = None  # sample only: keep tokens at least this fraction as likely as the top one
    repetition_penalty: float = 1.0  # every strategy: > 1 discourages tokens already in the context
    num_beams: int = 4  # beam only
    length_penalty: float = 1.0  # beam only: score = sum of log-probs / length ** length_penalty
    max_new_tokens: int = 100
    seed: int | None = None  # sample only: the same seed gives the same text
    context_slide: int = 1  # past the context, the window jumps this many tokens (1 = exact; see above)

    def validate(self, vocab_size: int | None = None) -> SamplingSettings:
        """Check every field (ConfigError naming the fix); ``vocab_size`` bounds num_beams when given."""
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}.")
        _check_filters(self.temperature, self.top_k, self.top_p, self.min_p)
        _check_repetition_penalty(self.repetition_penalty)
        if not _is_int(self.num_beams) or self.num_beams < 1:
            raise ConfigError(f"num_beams must be a whole number >= 1, got {self.num_beams!r}.")
        if vocab_size is not None and self.num_beams > vocab_size:
            raise ConfigError(
                f"num_beams ({self.num_beams}) cannot exceed the vocabulary size ({vocab_size}); "
                f"use at most {vocab_size} beams."
            )
        if not _is_number(self.length_penalty) or not math.isfinite(self.length_penalty):
            raise ConfigError(f"length_penalty must be a finite number, got {self.length_penalty!r}.")
        if not _is_int(self.max_new_tokens) or not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise ConfigError(
                f"max_new_tokens must be a whole number from 1 to {MAX_NEW_TOKENS:,}, got {self.max_new_tokens!r}."
            )
        if not _is_int(self.context_slide) or self.context_slide < 1:
            raise ConfigError(
                f"context_slide must be a whole number >= 1 (1 = the exact sliding window), got {self.context_slide!r}."
            )
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            raise ConfigError(f"seed must be a whole number >= 0 or None, got {self.seed!r}.")
        return self

    def describe(self) -> str:
        """A short label such as "sample T=0.8 top-k=40" (used as a legend and column title)."""
        if self.strategy == "greedy":
            parts = ["greedy"]
        elif self.strategy == "beam":
            parts = [f"beam ×{self.num_beams}"]
            if self.length_penalty != 1.0:
                parts.append(f"len-pen={self.length_penalty:g}")
        else:
            parts = ["sample", f"T={self.temperature:g}"]
            if self.top_k is not None:
                parts.append(f"top-k={self.top_k}")
            if self.top_p is not None and self.top_p < 1.0:
                parts.append(f"top-p={self.top_p:g}")
            if self.min_p is not None:
                parts.append(f"min-p={self.min_p:g}")
        if self.repetition_penalty != 1.0:
            parts.append(f"rep={self.repetition_penalty:g}")
        if self.context_slide != 1:
            parts.append(f"slide={self.context_slide}")
        return " ".join(parts)


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


@dataclass
class StepInfo:
    """One generated token. prob, logprob, rank and top describe the model's own distribution (the plain
    softmax of its logits at temperature 1: no repetition penalty, no filter), whatever the strategy,
    so two strategies that write the same text report the same numbers (issue 12). ``filtered_prob``
    is the chosen token's probability in the distribution the strategy actually picked from."""

    token_id: int
    token: str  # readable label of the token (tokenizer.token_strings)
    prob: float  # the model's probability of this token
    logprob: float  # its natural log (text_stats averages these)
    rank: int  # 1 = the model's most likely token
    top: list[tuple[str, float]]  # the model's TOP_N most likely (token, prob)
    # The probability in the distribution the token was picked from: sample: after the repetition penalty
    # and the processors (temperature, top-k, ...); greedy: 1, as top-k=1 (it keeps only its pick); beam:
    # the softmax after the repetition penalty (what beam scores add up).
    filtered_prob: float = 1.0


@dataclass
class GenerationResult:
    text: str  # the continuation only (decoded new tokens); full_text adds the prompt
    prompt: str
    token_ids: list[int]  # the new tokens, one per StepInfo
    steps: list[StepInfo]
    beams: list[tuple[str, float]] | None  # beam search: (continuation, score), best first
    settings: SamplingSettings
    elapsed_s: float
    tokens_per_s: float
    prompt_ids: list[int] = field(default_factory=list)  # what the model was conditioned on

    @property
    def full_text(self) -> str:
        return self.prompt + self.text


# ---------------------------------------------------------------------------------------------
# Hidden tokens

# Every tokenizer reserves the chat role tokens (<user>, <assistant>, <system>). Only a chat run
# (fine-tuned on conversations, chat.py) knows what they mean; any other model must never write
# them, so the one place that produces next-token logits (_NextLogits) sets theirs to -inf.


def hidden_token_ids(tokenizer: Any) -> list[int]:
    """Ids a model that is not a chat model must never produce: the tokenizer's reserved chat tokens
    (GPT-2's tokenizer reserves none; its <|endoftext|> is left alone)."""
    ids = tokenizer.special_token_ids
    return sorted(int(ids[t]) for t in tokenizer.special_tokens if t in ids)


def special_tokens_in(tokenizer: Any, text: str) -> list[str]:
    """The special tokens written in ``text``: each is read as one hidden token, not as its characters."""
    return [t for t in tokenizer.special_tokens if t in text]


def special_tokens_notice(tokenizer: Any, text: str) -> str | None:
    """What to tell someone whose prompt contains special tokens (None when it contains none)."""
    found = special_tokens_in(tokenizer, text)
    if not found:
        return None
    return (
        f"The prompt contains {', '.join(found)}: the tokenizer reads "
        f"{'each' if len(found) > 1 else 'it'} as one hidden chat token, not as text. Chat runs use "
        "these tokens to mark who speaks; other models never write them."
    )


# ---------------------------------------------------------------------------------------------
# The KV cache


def context_length(total: int, block_size: int, slide: int = 1, origin: int = 0) -> int:
    """How many of the last ``total`` tokens the model sees when it predicts the token after them.

    ``origin`` is where the first window started (a prompt longer than the context starts with its
    last block_size tokens: origin = prompt length - block_size). Up to block_size tokens after the
    origin it sees them all; past that the window jumps ``slide`` tokens at a time, as few jumps as
    leave at most block_size tokens: slide=1 keeps exactly the last block_size; slide=s sees
    block_size - s + 1 to block_size tokens.
    """
    if total - origin <= block_size:
        return total - origin
    start = origin + slide * -(-(total - origin - block_size) // slide)  # ceil(overflow / slide) jumps
    return total - start


class _NextLogits:
    """Next-token logits for a batch of sequences that grow one token per call, through the KV cache.

    Call it with the sequences so far (B, T), or with at least their last block_size tokens and
    ``total`` = their whole length; it returns float32 logits (B, V) for the token that follows,
    from the window ``context_length`` gives. With the cache, a window that grew by one token since
    the last call feeds only that token; any other (the first call, a slide) refills the cache
    from the window, or, for a full window (which the next token slides anyway), runs it uncached.
    """

    def __init__(self, model: torch.nn.Module, use_cache: bool, slide: int = 1, banned_ids: Sequence[int] = ()):
        self.model, self.use_cache, self.slide = model, use_cache, slide
        self.banned = list(banned_ids)  # ids never to produce (hidden tokens outside a chat run)
        self.block_size: int = model.config.block_size
        if slide > self.block_size:
            raise ConfigError(
                f"context_slide ({slide}) cannot exceed the model's context ({self.block_size} tokens); "
                f"{max(1, self.block_size // 2)} (half the context) is a good choice."
            )
        self.cache = KVCache(model.config.n_layer, self.block_size) if use_cache else None
        self.valid = False  # the cache holds the window of the last call
        self.seen_len = 0  # length of the sequences of the last call
        self.origin: int | None = None  # where the first window started (set by the first call)

    @functools.cached_property
    def step(self) -> DecodeStep | None:
        """The fast path without module calls (``decode_step``), None where it cannot serve. Asked for at
        the first cached call: a new one copies the weight matrices (kept on the model until they
        change), which a recomputing run never needs."""
        return DecodeStep.for_model(self.model) if self.use_cache else None

    def __call__(self, idx: torch.Tensor, total: int | None = None) -> torch.Tensor:
        # Inference mode skips autograd's bookkeeping of views and versions (at baby size 0.53 against
        # 0.58 ms per cached token, 1.87 against 2.11 ms per 64-token window; measured). Its tensors may
        # not be written to outside it, so the (B, V) logits are copied out; the cache never leaves it.
        with torch.inference_mode():
            logits = self._logits(idx, total)
        logits = logits.clone()
        if self.banned:
            logits[:, self.banned] = float("-inf")
        return logits

    def _logits(self, idx: torch.Tensor, total: int | None) -> torch.Tensor:
        T = idx.size(1) if total is None else total
        if self.origin is None:
            self.origin = max(0, T - self.block_size)
        L = context_length(T, self.block_size, self.slide, self.origin)
        grew_by_one, self.seen_len = T == self.seen_len + 1, T
        if self.cache is None:
            return self.model(idx[:, -L:]).logits[:, -1].float()
        step = self.step if self.step is not None and self.step.usable() else None
        if self.valid and grew_by_one and L == self.cache.length + 1:
            window = idx[:, -1:]  # one new token: one token's work
        else:  # (re)fill from the window; the next tokens extend it unless it is full (the next slides it)
            window = idx[:, -L:]
            self.cache.reset()
            self.valid = L < self.block_size
            if step is None and not self.valid:
                return self.model(window).logits[:, -1].float()  # nothing would read a cache written here
        if step is not None:
            return step(window, self.cache)  # the same logits, without module calls
        return self.model(window, past_kv=self.cache).logits[:, -1].float()  # through the model and its hooks

    def reorder(self, rows: torch.Tensor) -> None:
        """Beam search: sequence b now continues the old sequence rows[b]; its cache must follow."""
        if self.valid:
            with torch.inference_mode():  # where the cache was written
                self.cache.reorder(rows)


# ---------------------------------------------------------------------------------------------
# Strategies


def _step_record(model_logits: torch.Tensor, filtered_logp: torch.Tensor, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Per row: [token, model log-prob, model rank, model top-N log-probs, their ids, filtered log-prob].

    ``model_logits`` (B, V) are the model's raw logits, ``filtered_logp`` (B,) the chosen tokens' log-probs
    in the distribution each strategy picked from, ``tokens`` (B,) the chosen ids."""
    logp = torch.log_softmax(model_logits, dim=-1)
    chosen = logp.gather(1, tokens[:, None])[:, 0]
    rank = 1 + (logp > chosen[:, None]).sum(dim=1)
    top = torch.topk(logp, min(TOP_N, logp.size(-1)), dim=-1)
    return [tokens, chosen, rank, top.values, top.indices, filtered_logp]


class _Recorder:
    """Collects, per step, the chosen token's record (_step_record) of row 0 (beam search: the best beam)."""

    def __init__(self) -> None:
        self.rows: list[tuple[torch.Tensor, ...]] = []

    def add(self, model_logits: torch.Tensor, filtered_logp: torch.Tensor, token: torch.Tensor) -> None:
        # model_logits: (V,) raw logits; filtered_logp: () the token's log-prob where it was picked; token: ()
        record = _step_record(model_logits[None], filtered_logp.reshape(1), token.reshape(1))
        self.rows.append(tuple(r[0] for r in record))

    def steps(self, tokenizer: Any) -> list[StepInfo]:
        out = []
        for token, chosen, rank, top_lp, top_ids, filtered in self.rows:
            ids = top_ids.tolist()
            labels = tokenizer.token_strings([int(token)] + ids)
            out.append(
                StepInfo(
                    token_id=int(token),
                    token=labels[0],
                    prob=math.exp(float(chosen)),
                    logprob=float(chosen),
                    rank=int(rank),
                    top=[(lab, math.exp(lp)) for lab, lp in zip(labels[1:], top_lp.tolist())],
                    filtered_prob=math.exp(float(filtered)),
                )
            )
        return out


def _sample_loop(
    model: torch.nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    settings: SamplingSettings,
    use_cache: bool,
    generator: torch.Generator | None,
    recorder: _Recorder | None = None,
    banned_ids: Sequence[int] = (),
) -> torch.Tensor:
    """Greedy or sampled decoding of (B, T) -> (B, T + max_new_tokens)."""
    next_logits = _NextLogits(model, use_cache, settings.context_slide, banned_ids)
    greedy = settings.strategy == "greedy"
    B, T0 = idx.shape
    out = idx.new_empty(B, T0 + max_new_tokens)  # every token written in place, no concatenation per step
    out[:, :T0] = idx
    for t in range(T0, T0 + max_new_tokens):
        seq = out[:, :t]  # (B, t) the sequences so far
        raw = next_logits(seq)  # (B, V) the model's own
        logits = raw
        if settings.repetition_penalty != 1.0:
            logits = apply_repetition_penalty(logits, seq, settings.repetition_penalty)
        if greedy:
            used = None
            nxt = logits.argmax(dim=-1, keepdim=True)  # (B, 1); ties go to the lowest id
        else:
            used = process_logits(
                logits,
                temperature=settings.temperature,
                top_k=settings.top_k,
                top_p=settings.top_p,
                min_p=settings.min_p,
            )
            nxt = torch.multinomial(used.softmax(dim=-1), 1, generator=generator)  # (B, 1)
        if recorder is not None:
            token = nxt[0, 0]
            # greedy keeps only its pick, as top-k=1 does: probability 1 (log 0) where it picked
            picked = torch.zeros(()) if used is None else torch.log_softmax(used[0], dim=-1)[token]
            recorder.add(raw[0], picked, token)
        out[:, t] = nxt[:, 0]
    return out


def _beam_search(
    model: torch.nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    settings: SamplingSettings,
    use_cache: bool,
    recorder: _Recorder | None = None,
    banned_ids: Sequence[int] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Beam search from one prompt (1, T). Returns (sequences (nb, T + n), scores (nb,)), best first.

    Kept simple on purpose: the lab's tokenizers have no end-of-sequence token, so every beam runs
    for exactly max_new_tokens and there is no early stopping. At each step every beam is extended
    by every token and the num_beams best (beam, token) pairs by summed log-probability survive.
    A beam's score is its summed log-probability divided by length ** length_penalty, which is how
    transformers scores finished beams (length = new tokens). As all beams have the same length,
    length_penalty rescales the scores but never reorders them. Unlike transformers, which
    penalises the log-probs, the repetition penalty is applied to the logits before log_softmax,
    as in the other strategies, so the scores stay true log-probabilities and num_beams=1 is
    exactly greedy decoding.

    Linear in max_new_tokens: a step touches only what the model sees (the last block_size tokens
    of each beam), a (beams, vocab) mask of the tokens each beam has seen (the repetition penalty),
    and the KV cache; it appends one back-pointer (parent beam, token) and, for the winner's
    StepInfo, one record per beam. The sequences and the winner's history are read back through the
    back-pointers once, at the end, instead of re-indexing the whole history at every step.
    """
    nb = settings.num_beams
    next_logits = _NextLogits(model, use_cache, settings.context_slide, banned_ids)
    block = next_logits.block_size
    window = idx[:, -block:]  # (b, <= block) what the model sees of each beam; one beam to start with
    scores = torch.zeros(1, device=idx.device)  # (b,) summed log-probs
    penalty = settings.repetition_penalty
    seen = None  # (b, V) bool: tokens in each beam so far (prompt included), for the repetition penalty
    parents: list[torch.Tensor] = []  # per step (nb,): the beam each surviving beam extends
    chosen_tokens: list[torch.Tensor] = []  # per step (nb,): the token it appended
    records: list[list[torch.Tensor]] = []  # per step: (nb, ...) tensors for StepInfo
    for step in range(max_new_tokens):
        raw = logits = next_logits(window, total=idx.size(1) + step)  # (b, V); raw: the model's own, for StepInfo
        V = logits.size(-1)
        if penalty != 1.0:
            if seen is None:
                seen = torch.zeros(1, V, dtype=torch.bool, device=idx.device)
                seen[0, idx[0]] = True
            logits = torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)
        logp = torch.log_softmax(logits, dim=-1)  # (b, V)
        total = (scores[:, None] + logp).reshape(-1)  # (b * V,) every extension of every beam
        scores, flat = torch.topk(total, min(nb, total.numel()))  # sorted, best first
        rows, tokens = flat // V, flat % V
        window = torch.cat([window[rows], tokens[:, None]], dim=1)[:, -block:]
        next_logits.reorder(rows)
        if seen is not None:
            seen = seen[rows]
            seen[torch.arange(len(rows), device=seen.device), tokens] = True
        parents.append(rows)
        chosen_tokens.append(tokens)
        if recorder is not None:  # each surviving beam's step, from the beam it extends
            records.append(_step_record(raw[rows], logp[rows, tokens], tokens))
    # Follow the back-pointers from the last step to the first.
    n = len(parents)
    beam = torch.arange(len(scores), device=idx.device)  # (nb,) where each final beam sits at step t
    new = torch.empty(len(scores), n, dtype=idx.dtype, device=idx.device)
    best_rows: list[torch.Tensor] = []  # the row of the best beam at each step, last step first
    for t in range(n - 1, -1, -1):
        new[:, t] = chosen_tokens[t][beam]
        best_rows.append(beam[0])
        beam = parents[t][beam]
    if recorder is not None:
        best = torch.stack(best_rows).flip(0).tolist() if n else []
        recorder.rows = [tuple(h[best[t]] for h in records[t]) for t in range(n)]  # the best beam's history
    seqs = torch.cat([idx.expand(len(scores), -1), new], dim=1)
    return seqs, scores / (max_new_tokens**settings.length_penalty)


# ---------------------------------------------------------------------------------------------
# Public entry points


def _model_device(model: torch.nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def generate_ids(
    model: torch.nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    settings: SamplingSettings,
    *,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    banned_ids: Sequence[int] = (),
) -> torch.Tensor:
    """Low-level decoding of token ids: (B, T) -> (B, T + max_new_tokens).

    ``banned_ids`` are never produced (``hidden_token_ids`` of the run's tokenizer, outside a chat run).
    Greedy and sample work on any batch; beam search takes one prompt (B = 1) and returns its best
    beam. ``generator`` drives sampling (``settings.seed`` is ignored here: the caller owns the
    randomness, e.g. training draws its samples from its own generator). The model runs in eval
    mode without gradients and is put back in its previous mode afterwards. (Inference mode only around
    the model's calls, no_grad around the rest, so the returned ids can be used anywhere, training included.)
    """
    cfg = getattr(model, "config", None)
    settings.validate(None if cfg is None else cfg.vocab_size)
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens must be a whole number >= 0, got {max_new_tokens!r}.")
    if idx.dim() != 2 or idx.size(1) == 0:
        raise ConfigError(f"idx must be a (batch, time) tensor with at least one token, got shape {tuple(idx.shape)}.")
    if max_new_tokens == 0:
        return idx.clone()
    idx = idx.to(_model_device(model))
    with _eval_mode(model), torch.no_grad():
        if settings.strategy == "beam":
            if idx.size(0) != 1:
                raise ConfigError("Beam search decodes one prompt at a time (batch size 1).")
            seqs, _ = _beam_search(model, idx, max_new_tokens, settings, use_cache, banned_ids=banned_ids)
            return seqs[:1]
        return _sample_loop(model, idx, max_new_tokens, settings, use_cache, generator, banned_ids=banned_ids)


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """``model`` in eval mode inside the block, then back in the mode it was in.

    Switching modes sets an attribute on every module (about 0.25 ms there and back at ``baby`` size, as
    much as a decoded token, on every generation), so a model already wholly in eval mode, as a loaded
    run's is, is left as it is; nor does one visitor's generation then write to a model that the app
    shares between visitors' threads."""
    if not any(m.training for m in model.modules()):
        yield
        return
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """Encode the prompt (TokenizerError for unknown symbols); an empty one starts from a newline or id 0."""
    ids = tokenizer.encode(prompt) if prompt else []
    if ids:
        return ids
    try:
        ids = tokenizer.encode("\n")
    except TokenizerError:
        ids = []
    return ids[:1] or [0]


def _check_pair(model: torch.nn.Module, tokenizer: Any) -> None:
    if model.config.vocab_size != tokenizer.vocab_size:
        raise ConfigError(
            f"The tokenizer has {tokenizer.vocab_size} tokens but the model expects {model.config.vocab_size}: "
            "they do not belong to the same run. Load both from one run folder."
        )


def generate(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt: str,
    settings: SamplingSettings,
    *,
    use_cache: bool = True,
    device: str | torch.device | None = None,
    special_tokens: bool = False,
) -> GenerationResult:
    """Continue ``prompt`` with the strategy in ``settings``; records every step.

    The tokenizer's special (chat) tokens are never produced unless ``special_tokens`` (a chat run).
    Unknown symbols in the prompt raise the tokenizer's TokenizerError. ``device`` moves the model
    there first (default: wherever the model already is). The prompt may be longer than the
    model's context: only its last block_size tokens are seen.
    """
    settings.validate(model.config.vocab_size)
    _check_pair(model, tokenizer)
    if device is not None:
        model.to(device)
    dev = _model_device(model)
    prompt_ids = _prompt_ids(tokenizer, prompt)
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=dev)  # (1, T)
    n = settings.max_new_tokens
    recorder = _Recorder()
    banned = [] if special_tokens else hidden_token_ids(tokenizer)
    beams = None
    t0 = time.perf_counter()
    with _eval_mode(model), torch.no_grad():
        if settings.strategy == "beam":
            seqs, scores = _beam_search(model, idx, n, settings, use_cache, recorder, banned)
            new = seqs[:, idx.size(1) :].tolist()
            beams = [(tokenizer.decode(ids), float(s)) for ids, s in zip(new, scores.tolist())]
            new_ids = new[0]
        else:
            generator = None
            if settings.seed is not None:
                generator = torch.Generator(device=dev).manual_seed(settings.seed)
            out = _sample_loop(model, idx, n, settings, use_cache, generator, recorder, banned)
            new_ids = out[0, idx.size(1) :].tolist()
        steps = recorder.steps(tokenizer)
    elapsed = time.perf_counter() - t0
    return GenerationResult(
        text=tokenizer.decode(new_ids),
        prompt=prompt,
        token_ids=new_ids,
        steps=steps,
        beams=beams,
        settings=settings,
        elapsed_s=elapsed,
        tokens_per_s=len(new_ids) / elapsed if elapsed > 0 else float("inf"),
        prompt_ids=prompt_ids,
    )


def stream_ids(
    model: torch.nn.Module,
    idx: torch.Tensor,
    settings: SamplingSettings,
    *,
    stop_ids: Sequence[int] = (),
    banned_ids: Sequence[int] = (),
    generator: torch.Generator | None = None,
) -> Iterator[int]:
    """Greedy or sampled decoding of one prompt (1, T), yielding each new token id as it is chosen.

    Ends after ``settings.max_new_tokens`` tokens or at the first id in ``stop_ids`` (which is
    yielded: the caller sees why it ended). For a chat answer that streams to the screen token by
    token; beam search needs the whole sequence before it knows a token, so it is refused here.
    """
    settings.validate(model.config.vocab_size)
    if settings.strategy == "beam":
        raise ConfigError("Beam search cannot stream token by token; use greedy or sample.")
    if idx.dim() != 2 or idx.size(0) != 1 or idx.size(1) == 0:
        raise ConfigError(f"idx must be one (1, time) prompt with at least one token, got shape {tuple(idx.shape)}.")
    idx = idx.to(_model_device(model))
    if generator is None and settings.seed is not None:
        generator = torch.Generator(device=idx.device).manual_seed(settings.seed)
    stops = {int(i) for i in stop_ids}
    next_logits = _NextLogits(model, True, settings.context_slide, banned_ids)
    with _eval_mode(model):
        for _ in range(settings.max_new_tokens):
            with torch.no_grad():
                logits = next_logits(idx)
                if settings.repetition_penalty != 1.0:
                    logits = apply_repetition_penalty(logits, idx, settings.repetition_penalty)
                if settings.strategy == "greedy":
                    nxt = logits.argmax(dim=-1, keepdim=True)
                else:
                    used = process_logits(
                        logits,
                        temperature=settings.temperature,
                        top_k=settings.top_k,
                        top_p=settings.top_p,
                        min_p=settings.min_p,
                    )
                    nxt = torch.multinomial(used.softmax(dim=-1), 1, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
            token = int(nxt[0, 0])
            yield token
            if token in stops:
                return


def next_token_distribution(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt: str,
    settings_list: Sequence[SamplingSettings] | Mapping[str, SamplingSettings],
    *,
    special_tokens: bool = False,
) -> dict[str, Any]:
    """The model's next-token distribution after ``prompt`` and what each setting keeps of it.

    As in ``generate``, special tokens get probability 0 unless ``special_tokens`` (a chat run).
    Returns a dict:
      tokens     list[str] (V,)  a label per token id
      probs      np.ndarray (V,) the raw softmax (no penalty, no filter)
      kept       {label: bool np.ndarray (V,)}  tokens that setting can pick next
      processed  {label: np.ndarray (V,)}       the distribution that setting picks from
                 (zero where cut; greedy: all mass on its pick)
      prompt_ids list[int]; cropped bool (the prompt was longer than the context)
    Labels are ``settings.describe()`` (made unique) unless a mapping {label: settings} is given.
    For beam search, "kept" is the num_beams tokens the first beam step continues with.
    """
    _check_pair(model, tokenizer)
    items = (
        list(settings_list.items())
        if isinstance(settings_list, Mapping)
        else [(s.describe(), s) for s in settings_list]
    )
    labelled: list[tuple[str, SamplingSettings]] = []
    used_labels: set[str] = set()
    for label, s in items:
        s.validate(model.config.vocab_size)
        base, k = label, 2
        while label in used_labels:  # two columns with the same settings still need two keys
            label, k = f"{base} ({k})", k + 1
        used_labels.add(label)
        labelled.append((label, s))

    prompt_ids = _prompt_ids(tokenizer, prompt)
    block = model.config.block_size
    dev = _model_device(model)
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=dev)
    with _eval_mode(model), torch.no_grad():
        banned = [] if special_tokens else hidden_token_ids(tokenizer)
        logits = _NextLogits(model, False, banned_ids=banned)(idx)[0]  # (V,)
        kept, processed = {}, {}
        for label, s in labelled:
            x = apply_repetition_penalty(logits, idx[0], s.repetition_penalty)
            if s.strategy == "greedy":
                mask = torch.zeros_like(x, dtype=torch.bool)
                mask[x.argmax()] = True
            elif s.strategy == "beam":
                mask = torch.zeros_like(x, dtype=torch.bool)
                mask[torch.topk(x, s.num_beams).indices] = True
            else:
                x = process_logits(x, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, min_p=s.min_p)
                mask = torch.isfinite(x)
            p = x.masked_fill(~mask, float("-inf")).softmax(dim=-1) if s.strategy != "greedy" else mask.float()
            kept[label] = mask.cpu().numpy()
            processed[label] = p.cpu().numpy()
    V = logits.numel()
    return {
        "tokens": tokenizer.token_strings(list(range(V))),
        "probs": logits.softmax(dim=-1).cpu().numpy(),
        "kept": kept,
        "processed": processed,
        "prompt_ids": prompt_ids,
        "cropped": len(prompt_ids) > block,
    }


def text_stats(token_ids: Sequence[int], logprobs: Sequence[float] | None = None) -> dict[str, float]:
    """Summary numbers of a generated sequence (NaN where a number is undefined, e.g. too short).

    mean_logprob  mean log-probability of the chosen tokens (how sure the model was)
    perplexity    exp(-mean_logprob)
    distinct_2    unique bigrams / bigrams (1 = no bigram repeats; low = loops)
    repetition    fraction of 4-grams that already occurred earlier in the sequence
    n_tokens      number of tokens
    """
    ids = [int(t) for t in token_ids]
    nan = float("nan")
    lps = [float(x) for x in logprobs] if logprobs is not None else []
    mean_lp = sum(lps) / len(lps) if lps else nan
    bigrams = list(zip(ids, ids[1:]))
    distinct_2 = len(set(bigrams)) / len(bigrams) if bigrams else nan
    seen: set[tuple[int, ...]] = set()
    repeats = total = 0
    for i in range(len(ids) - 3):
        gram = tuple(ids[i : i + 4])
        repeats += gram in seen
        total += 1
        seen.add(gram)
    return {
        "mean_logprob": mean_lp,
        "perplexity": math.exp(-mean_lp) if lps else nan,
        "distinct_2": distinct_2,
        "repetition": repeats / total if total else nan,
        "n_tokens": float(len(ids)),
    }
