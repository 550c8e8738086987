"""GPT-2's tokenizer (``--tokenizer gpt2``) through tiktoken, exercised with a small Encoding built here:
the same code path as GPT-2's real one, no network and no cached vocabulary file needed."""

from __future__ import annotations

import json

import pytest
import tiktoken
import tiktoken.load
import tiktoken.registry

from tinygpt_core import cli, load_run
from tinygpt_core.errors import TokenizerError
from tinygpt_core.gpt2_tokenizer import GPT2Tokenizer, cache_file_name, gpt2_encoding
from tinygpt_core.tokenizers import load_tokenizer, train_tokenizer

R50K_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
MERGES = [b"th", b"he", b"the", b" t", b" the", b"in", b"ng", b"ing"]


def _small_gpt2() -> tiktoken.Encoding:
    ranks = {bytes([i]): i for i in range(256)}
    for m in MERGES:
        ranks[m] = len(ranks)
    return tiktoken.Encoding(
        name="gpt2", pat_str=R50K_PATTERN, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": len(ranks)}
    )


@pytest.fixture
def local_gpt2(monkeypatch):
    """tiktoken.get_encoding("gpt2") returns the small encoding, as it returns the real one when cached."""
    enc = _small_gpt2()
    real = tiktoken.get_encoding
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: enc if name == "gpt2" else real(name))
    return enc


def test_gpt2_tokenizer_encodes_with_the_encoding_and_round_trips(local_gpt2, tmp_path):
    tok = train_tokenizer("gpt2", "the thing")
    assert isinstance(tok, GPT2Tokenizer) and tok.vocab_size == local_gpt2.n_vocab == 256 + len(MERGES) + 1
    text = "the thing in the ring, 'tis <|endoftext|> é"
    ids = tok.encode(text)
    assert ids == local_gpt2.encode_ordinary(text) and tok.decode(ids) == text
    assert tok.eot_id not in ids  # typed text never becomes the control token
    assert tok.special_token_ids == {"<|endoftext|>": tok.eot_id} and tok.decode([tok.eot_id]) == "<|endoftext|>"
    assert tok.token_strings(tok.encode(" the")) == [" the"]
    tok.save(tmp_path / "tok.json")
    assert json.loads((tmp_path / "tok.json").read_text()) == {"kind": "gpt2", "version": 1, "encoding": "gpt2"}
    assert load_tokenizer(tmp_path / "tok.json").encode(text) == ids
    with pytest.raises(TokenizerError, match="leave the vocabulary size unset"):
        train_tokenizer("gpt2", "x", vocab_size=512)


def test_cli_run_on_gpt2_tokenizer_exports_gpt2_vocabulary(local_gpt2, tmp_path):
    from tinygpt_core.export import verify_export

    run, out = tmp_path / "run", tmp_path / "hf"
    args = ["train", "--corpus", "builtin:tiny", "--preset", "tiny", "--tokenizer", "gpt2", "--out", str(run)]
    assert cli.main([*args, "--max-iters", "4", "--eval-interval", "4", "--eval-iters", "1", "--no-progress"]) == 0
    loaded = load_run(run)
    assert loaded.tokenizer.kind == "gpt2" and loaded.config.model.vocab_size == local_gpt2.n_vocab
    assert cli.main(["export", str(run), "--format", "hf", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    eot = local_gpt2.n_vocab - 1
    assert (config["vocab_size"], config["eos_token_id"], config["bos_token_id"]) == (local_gpt2.n_vocab, eot, eot)
    assert "GPT-2's own" in (out / "README.md").read_text()
    assert verify_export(loaded.model, out) < 1e-4


def test_offline_without_the_vocabulary_says_where_to_place_it(monkeypatch, tmp_path):
    cache = tmp_path / "tiktoken-cache"
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    monkeypatch.delitem(tiktoken.registry.ENCODINGS, "gpt2", raising=False)  # nothing loaded in this process

    def no_network(url: str) -> bytes:
        raise ConnectionError(f"cannot reach {url}")

    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    with pytest.raises(TokenizerError) as err:
        gpt2_encoding()
    msg = str(err.value)
    assert "not on this machine" in msg and str(cache) in msg and "TIKTOKEN_CACHE_DIR" in msg
    vocab_bpe = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe"
    assert f"{vocab_bpe} saved as {cache / cache_file_name(vocab_bpe)}" in msg
    # The CLI says the same in one line, before any run folder is made.
    code = cli.main(["train", "--corpus", "builtin:tiny", "--tokenizer", "gpt2", "--out", str(tmp_path / "r")])
    assert code == 2 and not (tmp_path / "r").exists()
