"""Bad input, generated: arbitrary unicode, empty, huge and binary input to tokenizers, corpus
loading, prompts and sampling settings gives a correct result or a TinyGPTError with a message,
never another exception and never a hang (every test runs under pytest-timeout). Out-of-range
settings get a one-line message and exit code 2 from the CLI.

Example counts are modest so the file stays at a few seconds; each test prints nothing, the
number of inputs tried is hypothesis' max_examples (listed in docs/RELIABILITY.md).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as hs

from tinygpt_core.cli import main
from tinygpt_core.config import ModelConfig
from tinygpt_core.data import corpus_from_bytes, load_corpus
from tinygpt_core.errors import ConfigError, DataError, TokenizerError
from tinygpt_core.inspection import attention_maps
from tinygpt_core.model import GPT
from tinygpt_core.runs import RunStore
from tinygpt_core.sampling import SamplingSettings, generate, process_logits
from tinygpt_core.tokenizers import load_tokenizer, tokenizer_from_dict, train_tokenizer
from tinygpt_core.training import TrainSpec, prepare, train

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TINY_TEXT = load_corpus("builtin:tiny").text

# Text as users produce it, and as they should not: any code point (surrogates included), control
# characters, combining marks, emoji, right-to-left text, NUL bytes.
any_text = hs.text(hs.characters(codec=None, exclude_categories=()), max_size=300)
binary = hs.binary(max_size=2000)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def toks():
    return {kind: train_tokenizer(kind, TINY_TEXT, 300 if kind == "bpe" else None) for kind in ("char", "word", "bpe")}


@pytest.fixture(scope="module")
def models(toks):
    torch.manual_seed(0)
    return {
        kind: GPT(ModelConfig(vocab_size=t.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16)).eval()
        for kind, t in toks.items()
    }


# --- tokenizers -----------------------------------------------------------------------------------


@SETTINGS
@given(kind=hs.sampled_from(["char", "word", "bpe"]), text=any_text, vocab=hs.one_of(hs.none(), hs.integers(-5, 400)))
@example(kind="bpe", text="a\ud800b", vocab=None)  # a lone surrogate, once found by the search
def test_training_a_tokenizer_on_anything(kind, text, vocab):
    try:
        tok = train_tokenizer(kind, text, vocab)
    except TokenizerError as e:
        assert str(e)
        return
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    if kind == "char":
        assert tok.decode(ids) == text  # what it was trained on comes back exactly
    if kind == "bpe":
        # Exactly too, but for lone surrogates: they have no UTF-8 form (no corpus file or upload can hold
        # one), so BPE stores them with surrogatepass and decodes them as U+FFFD.
        assert tok.decode(ids) == text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


@SETTINGS
@given(kind=hs.sampled_from(["char", "word", "bpe"]), text=any_text)
def test_encoding_unseen_text(toks, kind, text):
    tok = toks[kind]
    try:
        ids = tok.encode(text)
    except TokenizerError as e:
        assert kind == "char" and "unknown" in str(e).lower() or str(e)
        return
    assert all(0 <= i < tok.vocab_size for i in ids)
    if kind == "bpe":
        assert tok.decode(ids) == text.encode("utf-8", "surrogatepass").decode("utf-8", "replace") or tok.decode(
            ids
        )  # lone surrogates cannot round-trip through UTF-8; they must not crash


@SETTINGS
@given(kind=hs.sampled_from(["char", "word", "bpe"]), ids=hs.lists(hs.integers(-(10**12), 10**12), max_size=50))
def test_decoding_arbitrary_ids(toks, kind, ids):
    tok = toks[kind]
    try:
        assert isinstance(tok.decode(ids), str)
    except TokenizerError as e:
        assert "vocabulary" in str(e) or str(e)
        assert any(not 0 <= i < tok.vocab_size for i in ids)


json_values = hs.recursive(
    hs.none() | hs.booleans() | hs.integers() | hs.floats(allow_nan=False) | hs.text(max_size=20),
    lambda children: hs.lists(children, max_size=5) | hs.dictionaries(hs.text(max_size=10), children, max_size=5),
    max_leaves=30,
)


@SETTINGS
@given(base=hs.sampled_from(["char", "word", "bpe"]), key=hs.text(max_size=15), value=json_values)
def test_a_tokenizer_file_with_unexpected_content(toks, tmp_path_factory, base, key, value):
    d = toks[base].to_dict()
    d[key if key else "kind"] = value  # replace or add one field with anything JSON can hold
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    path.write_text(json.dumps(d))
    try:
        tok = load_tokenizer(path)
    except TokenizerError as e:
        assert str(e)
        return
    assert tok.vocab_size >= 1  # accepted: then it is a working tokenizer
    tok.decode(list(range(min(5, tok.vocab_size))))


@SETTINGS
@given(value=json_values)
def test_tokenizer_from_any_json_value(value):
    try:
        tokenizer_from_dict(value)
    except TokenizerError:
        pass


@settings(max_examples=40, deadline=None)
@given(data=binary)
def test_a_binary_tokenizer_file(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("tokbin") / "tokenizer.json"
    path.write_bytes(data)
    with pytest.raises(TokenizerError):
        load_tokenizer(path)


# --- corpus loading -------------------------------------------------------------------------------


@SETTINGS
@given(name=hs.text(max_size=50), data=hs.one_of(binary, any_text.map(lambda t: t.encode("utf-8", "surrogatepass"))))
def test_corpus_from_any_bytes(name, data):
    try:
        corpus = corpus_from_bytes(name, data)
    except DataError as e:
        assert str(e)
        return
    assert corpus.text == data.decode("utf-8-sig") and corpus.text.strip()


def test_a_huge_upload_is_refused_by_size_before_decoding():
    with pytest.raises(DataError, match="limited to 1,000"):
        corpus_from_bytes("big.txt", b"\xff" * 5000, max_bytes=1000)  # not even valid UTF-8: size comes first


@pytest.mark.timeout(120)
def test_a_large_corpus_trains_a_tokenizer_and_splits_in_seconds(tmp_path):
    path = tmp_path / "big.txt"
    path.write_text(TINY_TEXT * 700)  # ~1 MB
    spec = TrainSpec.from_preset(
        "tiny",
        str(path),
        tokenizer="bpe",
        tokenizer_vocab_size=300,
        n_layer=1,
        n_embd=16,
        block_size=16,
        max_iters=1,
        eval_interval=1,
        eval_iters=1,
        batch_size=2,
        sample_tokens=0,
        device="cpu",
        warmup_iters=0,
    )
    prepare(spec)  # loads the corpus, trains the BPE tokenizer, encodes and splits


# --- prompts and sampling settings ----------------------------------------------------------------


@SETTINGS
@given(
    kind=hs.sampled_from(["char", "word", "bpe"]),
    prompt=any_text,
    strategy=hs.sampled_from(["greedy", "sample", "beam"]),
)
def test_generating_from_any_prompt(toks, models, kind, prompt, strategy):
    s = SamplingSettings(strategy=strategy, max_new_tokens=3, num_beams=2, seed=1)
    try:
        result = generate(models[kind], toks[kind], prompt, s)
    except TokenizerError as e:
        assert kind == "char" and str(e)  # only the char tokenizer has no way to spell unknown symbols
        return
    assert len(result.token_ids) >= 3


@SETTINGS
@given(kind=hs.sampled_from(["char", "bpe"]), prompt=any_text)
def test_attention_maps_of_any_prompt(toks, models, kind, prompt):
    try:
        maps = attention_maps(models[kind], toks[kind], prompt)
    except TokenizerError as e:
        assert str(e)
        return
    assert len(maps.tokens) <= 16 and maps.cropped == (len(toks[kind].encode(prompt)) > 16)


def test_a_huge_prompt_is_cropped_to_the_context_not_a_hang(toks, models):
    prompt = TINY_TEXT * 300  # ~440 k characters
    result = generate(models["bpe"], toks["bpe"], prompt, SamplingSettings(strategy="greedy", max_new_tokens=2))
    assert len(result.token_ids) == 2 or result.token_ids
    assert attention_maps(models["char"], toks["char"], prompt).cropped


numbers = hs.one_of(
    hs.none(),
    hs.floats(allow_nan=True, allow_infinity=True),
    hs.integers(-10, 10**6),
    hs.sampled_from([0, 0.0, -0.0, 1, 1.0, 1e-300, True, "1", [1]]),
)


def _or_anything(valid):
    """Mostly in range (so generation itself gets exercised), sometimes anything at all."""
    return hs.integers(0, 7).flatmap(lambda n: numbers if n == 0 else valid)


@settings(max_examples=150, deadline=None)
@given(
    temperature=_or_anything(hs.floats(0.05, 5)),
    top_k=_or_anything(hs.none() | hs.integers(1, 400)),
    top_p=_or_anything(hs.none() | hs.floats(0.01, 1)),
    min_p=_or_anything(hs.none() | hs.floats(0, 1)),
    beams=_or_anything(hs.integers(1, 8)),
    rep=_or_anything(hs.floats(0.5, 2)),
    strategy=hs.sampled_from(["greedy", "sample", "beam"]),
)
@example(temperature=1.0, top_k=None, top_p=None, min_p=None, beams=4, rep=5e-324, strategy="sample")  # was a crash
@example(temperature=1e-300, top_k=None, top_p=None, min_p=None, beams=4, rep=1.0, strategy="sample")
@example(temperature=1.0, top_k=None, top_p=None, min_p=None, beams=4, rep=1e300, strategy="beam")
def test_any_sampling_settings(toks, models, temperature, top_k, top_p, min_p, beams, rep, strategy):
    s = SamplingSettings(
        strategy=strategy,
        temperature=1.0 if temperature is None else temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        num_beams=4 if beams is None else beams,
        repetition_penalty=1.0 if rep is None else rep,
        max_new_tokens=2,
        seed=0,
    )
    try:
        s.validate(toks["bpe"].vocab_size)
    except ConfigError as e:
        assert str(e)
        event("refused with ConfigError")
        return
    event("generated")
    result = generate(models["bpe"], toks["bpe"], "the", s)
    assert len(result.token_ids) == 2
    if strategy == "sample":  # the filters leave at least one token to pick
        logits = process_logits(
            torch.randn(3, toks["bpe"].vocab_size),
            temperature=s.temperature,
            top_k=s.top_k,
            top_p=s.top_p,
            min_p=s.min_p,
        )
        assert torch.isfinite(logits).any(dim=-1).all()


# --- out-of-range settings in the CLI -------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    spec = TrainSpec.from_preset(
        "tiny",
        "builtin:tiny",
        n_layer=1,
        n_head=2,
        n_embd=16,
        block_size=16,
        max_iters=2,
        eval_interval=2,
        eval_iters=1,
        batch_size=2,
        sample_tokens=0,
        device="cpu",
    )
    return train(spec, store=RunStore(tmp_path_factory.mktemp("cli") / "runs")).run_dir


GENERATE_CASES = {  # flags -> words the message must contain
    ("--top-p", "0"): "top_p must be in (0, 1]",
    ("--top-p", "1.5"): "top_p must be in (0, 1]",
    ("--top-k", "0"): "top_k must be a whole number >= 1",
    ("--temperature", "0"): "use greedy for temperature 0",
    ("--temperature", "-1"): "temperature must be a number > 0",
    ("--temperature", "nan"): "temperature must be a number > 0",
    ("--min-p", "2"): "min_p must be in [0, 1]",
    ("--strategy", "beam", "--num-beams", "1000"): "cannot exceed the vocabulary size",
    ("--num-beams", "0", "--strategy", "beam"): "num_beams must be a whole number >= 1",
    ("--max-new-tokens", "0"): "max_new_tokens must be a whole number from 1 to",
    ("--max-new-tokens", "1000000000"): "max_new_tokens must be a whole number from 1 to",
    ("--repetition-penalty", "0"): "repetition_penalty must be a number > 0",
    ("--repetition-penalty", "5e-324"): "repetition_penalty must be between",  # found by hypothesis: crashed
    ("--temperature", "1e-300"): "temperature must be at least",  # the same overflow through temperature
    ("--temperature", "150"): "temperature must be at most 100",  # the app's bound too (issue 12)
}


@pytest.mark.parametrize("flags", list(GENERATE_CASES), ids=[" ".join(f) for f in GENERATE_CASES])
def test_cli_generate_out_of_range(run_dir, capsys, flags):
    code = main(["generate", str(run_dir), "--prompt", "the", *flags])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert GENERATE_CASES[flags] in err


TRAIN_CASES = {
    ("--block-size", "4096"): "context",  # longer than the corpus can fill
    ("--block-size", "100000"): "block_size must be a whole number >= 1 and <= 8,192",  # the lab's longest
    ("--block-size", "0"): "block_size must be a whole number >= 1",
    ("--n-head", "3"): "divisible",
    ("--lr", "0"): "lr must be in (0, 1]",
    ("--dropout", "1"): "dropout must be in [0, 1)",
    ("--max-iters", "0"): "max_iters",
}


@pytest.mark.parametrize("flags", list(TRAIN_CASES), ids=[" ".join(f) for f in TRAIN_CASES])
def test_cli_train_out_of_range_writes_nothing(tmp_path, capsys, flags):
    out = tmp_path / "never"
    code = main(["train", "--corpus", "builtin:tiny", "--out", str(out), "--no-progress", *flags])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and TRAIN_CASES[flags] in err, err
    assert not out.exists()


def test_cli_out_of_range_in_a_real_process(run_dir):
    """The same path end to end: a real interpreter, stderr, exit status, no traceback."""
    p = subprocess.run(
        [sys.executable, "-m", "tinygpt_core", "generate", str(run_dir), "--top-p", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2 and p.stderr.startswith("error: top_p") and "Traceback" not in p.stderr


def test_model_context_is_enforced(models):
    """The model itself refuses more tokens than its context (pages and the CLI crop before that)."""
    with pytest.raises(ValueError, match="longer than the model's context"):
        models["char"](torch.zeros(1, 17, dtype=torch.long))
    with torch.no_grad():
        assert not math.isnan(float(models["char"](torch.zeros(1, 16, dtype=torch.long)).logits.sum()))
