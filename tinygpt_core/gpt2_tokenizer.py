"""GPT-2's own tokenizer (``kind = "gpt2"``), through tiktoken, behind the lab's ``Tokenizer`` interface.

A run trained with it has GPT-2's 50,257-token vocabulary, so its Hugging Face export pairs with
GPT-2's tokenizer (``GPT2TokenizerFast.from_pretrained("gpt2")``, ``tiktoken.get_encoding("gpt2")``).
Nothing is trained: the vocabulary is fixed, and the tokenizer file only names the encoding.

tiktoken downloads GPT-2's two vocabulary files once and keeps them in its cache folder
(``$TIKTOKEN_CACHE_DIR``, else ``$DATA_GYM_CACHE_DIR``, else ``<temp dir>/data-gym-cache``). On a machine
without network and without those files, ``gpt2_encoding`` says exactly that and where to put them.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import TokenizerError
from .tokenizers import FORMAT_VERSION, Tokenizer, readable_bytes

ENCODING_NAME = "gpt2"
GPT2_VOCAB_SIZE = 50_257  # 50,000 merges + 256 bytes + <|endoftext|>
END_OF_TEXT = "<|endoftext|>"
# The files tiktoken's "gpt2" encoding reads (tiktoken_ext.openai_public.gpt2).
VOCAB_FILES = (
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
)
INSTALL_HINT = "pip install 'tiktoken>=0.7,<1'"  # as requirements.txt


def tiktoken_cache_dir() -> Path:
    """The folder tiktoken reads cached vocabulary files from (the same rule as tiktoken.load)."""
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if os.environ.get(var):
            return Path(os.environ[var])
    return Path(tempfile.gettempdir()) / "data-gym-cache"


def cache_file_name(url: str) -> str:
    """The name tiktoken gives a downloaded file in its cache: the SHA-1 of its address."""
    return hashlib.sha1(url.encode()).hexdigest()


def offline_message(reason: str) -> str:
    cache = tiktoken_cache_dir()
    placed = "; ".join(f"{url} saved as {cache / cache_file_name(url)}" for url in VOCAB_FILES)
    return (
        f"GPT-2's vocabulary is not on this machine and could not be downloaded ({reason}). tiktoken keeps it "
        f"in {cache} (set TIKTOKEN_CACHE_DIR to choose a lasting folder). On a machine with internet, run "
        "`python -c \"import tiktoken; tiktoken.get_encoding('gpt2')\"` once with the same TIKTOKEN_CACHE_DIR "
        f"and copy that folder here, or download the two files yourself: {placed}."
    )


def gpt2_encoding() -> Any:
    """tiktoken's "gpt2" Encoding; TokenizerError (what to install, or where to place the files) otherwise."""
    try:
        import tiktoken
    except ImportError:
        raise TokenizerError(f"The gpt2 tokenizer needs the tiktoken package: {INSTALL_HINT}.") from None
    try:
        return tiktoken.get_encoding(ENCODING_NAME)
    except Exception as exc:  # noqa: BLE001 - requests' connection errors, a bad cached file, …
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}" if str(exc) else type(exc).__name__
        raise TokenizerError(offline_message(reason)) from None


class GPT2Tokenizer(Tokenizer):
    """GPT-2's byte-level BPE (a tiktoken Encoding). Text never produces <|endoftext|>; the id decodes."""

    kind = "gpt2"

    def __init__(self, encoding: Any):
        super().__init__(())  # the lab's chat tokens are not in GPT-2's vocabulary
        self.encoding = encoding
        has_eot = END_OF_TEXT in encoding.special_tokens_set
        self.eot_id: int | None = encoding.encode_single_token(END_OF_TEXT) if has_eot else None

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    @property
    def special_token_ids(self) -> dict[str, int]:
        return {} if self.eot_id is None else {END_OF_TEXT: self.eot_id}

    def encode(self, text: str) -> list[int]:
        # encode_ordinary: "<|endoftext|>" typed in a text is plain text, never the control token.
        return self.encoding.encode_ordinary(text)

    def decode(self, ids: Sequence[int]) -> str:
        # Whole sequences decode bytes first, so a character split over two tokens comes back whole.
        return self.encoding.decode_bytes(self._check_ids(ids)).decode("utf-8", errors="replace")

    def _id_to_text(self, i: int) -> str:
        return readable_bytes(self.encoding.decode_single_token_bytes(i))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "version": FORMAT_VERSION, "encoding": ENCODING_NAME}


def gpt2_tokenizer(vocab_size: int | None = None) -> GPT2Tokenizer:
    """The gpt2 tokenizer (for ``train_tokenizer("gpt2", …)``); its vocabulary is fixed, so any other
    size asked for is refused."""
    tok = GPT2Tokenizer(gpt2_encoding())
    if vocab_size is not None and vocab_size != tok.vocab_size:
        raise TokenizerError(
            f"The gpt2 tokenizer's vocabulary is GPT-2's own {tok.vocab_size:,} tokens; leave the vocabulary "
            f"size unset (got {vocab_size:,})."
        )
    return tok


def gpt2_from_dict(d: dict[str, Any]) -> GPT2Tokenizer:
    if d.get("encoding") != ENCODING_NAME:
        raise TokenizerError(f"Tokenizer file: unknown encoding {d.get('encoding')!r} (expected {ENCODING_NAME!r}).")
    return GPT2Tokenizer(gpt2_encoding())
