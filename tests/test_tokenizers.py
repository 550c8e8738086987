"""Tests for tinygpt_core.tokenizers: round trips, special tokens, errors, files, BPE internals."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tinygpt_core.errors import TokenizerError
from tinygpt_core.tokenizers import (
    DEFAULT_SPECIAL_TOKENS,
    BPETokenizer,
    CharTokenizer,
    Tokenizer,
    WordTokenizer,
    load_tokenizer,
    tokenizer_from_dict,
    train_tokenizer,
)

ENGLISH = (
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away!\n"
    "It's 2024, and they're counting: one, two, three... Then the fox came back.\n"
) * 20

UNICODE = (
    "emoji 😀👍🏽 flags 🇫🇷, CJK 日本語の文章, Cyrillic жук, combining e\u0301 a\u0308, "
    "tabs\tand\r\nwindows lines, nbsp\u00a0here, zero-width\u200bjoin, ﬁ ligature, 𝔘𝔫𝔦𝔠𝔬𝔡𝔢\n"
)


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    tok = train_tokenizer("bpe", ENGLISH, vocab_size=256 + len(DEFAULT_SPECIAL_TOKENS) + 60)
    assert isinstance(tok, BPETokenizer)
    return tok


@pytest.fixture(scope="module")
def all_three(bpe: BPETokenizer) -> list[Tokenizer]:
    text = ENGLISH + UNICODE
    return [train_tokenizer("char", text), train_tokenizer("word", text), bpe]


# --- round trips -----------------------------------------------------------------------------


def test_char_round_trips_unicode_it_was_trained_on() -> None:
    tok = train_tokenizer("char", UNICODE)
    assert tok.kind == "char"
    assert tok.decode(tok.encode(UNICODE)) == UNICODE
    assert tok.vocab_size == len(set(UNICODE)) + len(DEFAULT_SPECIAL_TOKENS)


def test_char_vocabulary_is_sorted_characters_then_specials() -> None:
    tok = train_tokenizer("char", "cabbage")
    assert tok.token_strings(range(tok.vocab_size)) == ["a", "b", "c", "e", "g", *DEFAULT_SPECIAL_TOKENS]


def test_bpe_round_trips_unseen_unicode(bpe: BPETokenizer) -> None:
    assert bpe.decode(bpe.encode(UNICODE)) == UNICODE
    assert bpe.decode(bpe.encode(ENGLISH)) == ENGLISH
    # Merges learned on English make English shorter than its bytes.
    assert len(bpe.encode(ENGLISH)) < len(ENGLISH.encode("utf-8")) / 2


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_bpe_round_trips_any_text(bpe: BPETokenizer, text: str) -> None:
    assert bpe.decode(bpe.encode(text)) == text


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.text(), st.sampled_from(DEFAULT_SPECIAL_TOKENS))).map("".join))
def test_bpe_round_trips_text_mixed_with_special_tokens(bpe: BPETokenizer, text: str) -> None:
    assert bpe.decode(bpe.encode(text)) == text


@settings(max_examples=100, deadline=None)
@given(st.text(min_size=1))
def test_char_round_trips_its_training_text(text: str) -> None:
    tok = train_tokenizer("char", text)
    assert tok.decode(tok.encode(text)) == text


def test_bpe_never_fails_even_on_lone_surrogates(bpe: BPETokenizer) -> None:
    out = bpe.decode(bpe.encode("a\ud800b"))  # not valid Unicode: comes back replaced, no error
    assert out.startswith("a\ufffd") and out.endswith("\ufffdb")


def test_word_round_trips_in_vocabulary_text() -> None:
    tok = train_tokenizer("word", ENGLISH + UNICODE)
    for text in (ENGLISH, UNICODE, "the fox\nruns\t!"):
        assert tok.decode(tok.encode(text)) == text


def test_word_pieces_are_words_numbers_punctuation_and_whitespace() -> None:
    tok = train_tokenizer("word", "Hello, world!  It is 2024.\n")
    ids = tok.encode("Hello, world!  It is 2024.\n")
    assert tok.token_strings(ids) == ["Hello", ",", " ", "world", "!", "  ", "It", " ", "is", " ", "2024", ".", "\n"]


# --- special tokens --------------------------------------------------------------------------


def test_special_tokens_encode_to_one_id_and_decode_back(all_three: list[Tokenizer]) -> None:
    for tok in all_three:
        for special in DEFAULT_SPECIAL_TOKENS:
            ids = tok.encode(special)
            assert len(ids) == 1, tok.kind
            assert ids[0] == tok.special_token_ids[special]
            assert tok.decode(ids) == special
        text = "<system>the fox<user>the dog, 2024!<assistant>they're away."
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert sum(i in tok.special_token_ids.values() for i in ids) == 3


def test_special_token_ids_are_the_last_ids(all_three: list[Tokenizer]) -> None:
    for tok in all_three:
        n = len(DEFAULT_SPECIAL_TOKENS)
        assert sorted(tok.special_token_ids.values()) == list(range(tok.vocab_size - n, tok.vocab_size))


def test_custom_and_no_special_tokens() -> None:
    tok = train_tokenizer("char", "abc", special_tokens=["<eot>"])
    assert tok.encode("a<eot>b") == [0, 3, 1]
    none = train_tokenizer("bpe", "abc abc", vocab_size=260, special_tokens=())
    assert none.special_tokens == ()
    assert none.decode(none.encode("<user>")) == "<user>"
    with pytest.raises(TokenizerError):
        train_tokenizer("char", "abc", special_tokens=["<a>", "<a>"])


# --- unknown symbols -------------------------------------------------------------------------


def test_char_unknown_symbols_raise_naming_them() -> None:
    tok = train_tokenizer("char", "hello world")
    assert tok.unknown_symbols("hello ж€ж") == ["ж", "€"]
    assert tok.unknown_symbols("hello") == []
    with pytest.raises(TokenizerError) as info:
        tok.encode("hello ж€ж")
    msg = str(info.value)
    assert "2 symbols" in msg and "'ж'" in msg and "'€'" in msg
    assert "train on a corpus" in msg


def test_word_unknown_words_map_to_unk() -> None:
    tok = train_tokenizer("word", "the cat sat on the mat")
    ids = tok.encode("the dog sat")
    assert ids[0] != 0 and ids[2] == 0  # "dog" is unknown
    assert tok.decode(ids) == "the <unk> sat"
    assert tok.unknown_symbols("the dog and the emu") == ["dog", "and", "emu"]
    # "<unk>" typed in the text is the unknown token itself.
    assert tok.encode("<unk>") == [0]


def test_word_vocab_size_keeps_most_frequent() -> None:
    text = "a a a a b b b c c d"
    tok = train_tokenizer("word", text, vocab_size=1 + len(DEFAULT_SPECIAL_TOKENS) + 3)
    assert isinstance(tok, WordTokenizer)
    assert tok.pieces == [" ", "a", "b"]
    assert tok.unknown_symbols(text) == ["c", "d"]
    with pytest.raises(TokenizerError):
        train_tokenizer("word", text, vocab_size=3)


def test_bpe_never_has_unknowns(bpe: BPETokenizer) -> None:
    assert bpe.unknown_symbols(UNICODE) == []


# --- decode errors and labels ----------------------------------------------------------------


def test_decode_rejects_out_of_range_ids(all_three: list[Tokenizer]) -> None:
    for tok in all_three:
        with pytest.raises(TokenizerError, match="outside"):
            tok.decode([0, tok.vocab_size])
        with pytest.raises(TokenizerError):
            tok.decode([-1])
        with pytest.raises(TokenizerError):
            tok.token_strings([tok.vocab_size + 10])


def test_decode_accepts_tensors(bpe: BPETokenizer) -> None:
    ids = bpe.encode("the fox")
    assert bpe.decode(torch.tensor(ids)) == "the fox"


def test_bpe_token_strings_label_partial_bytes_readably(bpe: BPETokenizer) -> None:
    labels = bpe.token_strings(bpe.encode(" the 😀"))
    # The emoji's four bytes are separate tokens, each labelled by its byte value, never U+FFFD.
    assert labels[0] == " the" and labels[-4:] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    assert not any("\ufffd" in t for t in labels)
    assert bpe.decode(bpe.encode("😀")) == "😀"  # decoding joins the bytes back into the character
    assert bpe.decode(bpe.encode("😀")[:1]) == "\ufffd"  # half a character decodes, replaced


def test_readable_bytes_keeps_whole_characters_and_labels_stray_bytes() -> None:
    from tinygpt_core.tokenizers import readable_bytes

    assert readable_bytes("é—a".encode()) == "é—a"
    assert readable_bytes(b"\xe2\x80") == "<0xE2><0x80>"
    assert readable_bytes(b"ok\xff") == "ok<0xFF>"


# --- training errors -------------------------------------------------------------------------


def test_train_tokenizer_errors() -> None:
    with pytest.raises(TokenizerError, match="at least 259"):
        train_tokenizer("bpe", ENGLISH, vocab_size=258)
    with pytest.raises(TokenizerError, match="kind"):
        train_tokenizer("sentencepiece", ENGLISH)
    with pytest.raises(TokenizerError, match="empty"):
        train_tokenizer("char", "")
    with pytest.raises(TokenizerError):
        train_tokenizer("bpe", ENGLISH, vocab_size=0)


# --- BPE internals ---------------------------------------------------------------------------


def test_bpe_first_merge_is_most_frequent_pair() -> None:
    # Chunks: "xy", " xy" x4, " q", " zw" -> ("x","y") occurs 5 times, (" ","x") 4 times.
    tok = train_tokenizer("bpe", "xy xy xy xy xy q zw", vocab_size=256 + 3 + 3)
    assert isinstance(tok, BPETokenizer)
    assert tok.merges[0] == (ord("x"), ord("y"))
    assert tok.merges[1] == (ord(" "), 256)  # then " " + "xy"
    assert tok.merge_labels()[:2] == [("x", "y", "xy"), (" ", "xy", " xy")]
    assert tok.encode(" xy") == [257]


def test_bpe_merges_are_in_learning_order(bpe: BPETokenizer) -> None:
    assert len(bpe.merges) == 60
    for k, (a, b) in enumerate(bpe.merges):
        assert 0 <= a < 256 + k and 0 <= b < 256 + k  # only earlier tokens can be merged
    assert len(set(bpe.merges)) == len(bpe.merges)
    for left, right, merged in bpe.merge_labels():
        assert left + right == merged


def test_bpe_stops_when_nothing_is_left_to_merge() -> None:
    tok = train_tokenizer("bpe", "ab", vocab_size=1000)
    assert tok.merges == [(ord("a"), ord("b"))]
    assert tok.vocab_size == 256 + 1 + len(DEFAULT_SPECIAL_TOKENS)


def test_encode_steps_end_at_the_final_encoding(bpe: BPETokenizer) -> None:
    text = "The fox<user> runs away, 😀!"
    steps = bpe.encode_steps(text)
    assert steps[0][:3] == ["T", "h", "e"]
    assert "<user>" in steps[0]
    assert steps[-1] == bpe.token_strings(bpe.encode(text))
    for before, after in zip(steps, steps[1:]):
        assert len(after) < len(before)  # every listed step changed something
    assert len(bpe.encode_steps(text, max_steps=2)) == 3


# --- saving and loading ----------------------------------------------------------------------


def test_save_load_round_trip(all_three: list[Tokenizer], tmp_path) -> None:
    for tok in all_three:
        path = tmp_path / f"{tok.kind}.json"
        tok.save(path)
        loaded = load_tokenizer(path)
        assert type(loaded) is type(tok)
        assert loaded.to_dict() == tok.to_dict()
        assert loaded.encode(ENGLISH + UNICODE) == tok.encode(ENGLISH + UNICODE)
        assert json.loads(path.read_text())["kind"] == tok.kind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bpe.json", "char.json", "word.json"]  # no temp files left


def test_load_tokenizer_errors(tmp_path) -> None:
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(TokenizerError, match="not valid JSON"):
        load_tokenizer(bad)
    with pytest.raises(TokenizerError):
        load_tokenizer(tmp_path)


def _mutated(d: dict, **changes) -> dict:
    out = json.loads(json.dumps(d))
    for k, v in changes.items():
        if v is _DELETE:
            del out[k]
        else:
            out[k] = v
    return out


_DELETE = object()


def test_tokenizer_from_dict_rejects_malformed(all_three: list[Tokenizer]) -> None:
    char, word, bpe = (t.to_dict() for t in all_three)
    n = len(bpe["merges"])
    bad = [
        "not a dict",
        _mutated(char, kind="sentencepiece"),
        _mutated(char, kind="bpe"),  # fields of the wrong kind
        _mutated(char, version=99),
        _mutated(char, vocab=_DELETE),
        _mutated(char, extra=1),
        _mutated(char, vocab=["a", "bc"]),
        _mutated(char, vocab=["a", "a"]),
        _mutated(char, vocab=[1, 2]),
        _mutated(char, special_tokens="<user>"),
        _mutated(char, special_tokens=[3]),
        _mutated(word, unk_token="<oov>"),
        _mutated(word, vocab=["the", ""]),
        _mutated(bpe, merges=_DELETE),
        _mutated(bpe, merges=[[97, "98"]] + bpe["merges"][1:]),  # non-int id
        _mutated(bpe, merges=[[97.0, 98]] + bpe["merges"][1:]),
        _mutated(bpe, merges=[[True, 98]] + bpe["merges"][1:]),
        _mutated(bpe, merges=[[97, 256]] + bpe["merges"][1:]),  # id not yet defined
        _mutated(bpe, merges=[[97, 10**30]] + bpe["merges"][1:]),  # huge id
        _mutated(bpe, merges=[[-1, 98]] + bpe["merges"][1:]),
        _mutated(bpe, merges=[[97, 98, 99]] + bpe["merges"][1:]),
        _mutated(bpe, merges=bpe["merges"] + [bpe["merges"][0]]),  # repeated pair
        _mutated(bpe, vocab_size=256 + n),  # disagrees with merges + specials
        _mutated(bpe, vocab_size="300"),
        _mutated(bpe, pre_tokenizer="(a+)+$"),
    ]
    for d in bad:
        with pytest.raises(TokenizerError):
            tokenizer_from_dict(d)  # type: ignore[arg-type]


def test_tokenizer_from_dict_accepts_its_own_output(all_three: list[Tokenizer]) -> None:
    for tok in all_three:
        rebuilt = tokenizer_from_dict(tok.to_dict())
        assert rebuilt.vocab_size == tok.vocab_size
        assert isinstance(rebuilt, (CharTokenizer, WordTokenizer, BPETokenizer))
