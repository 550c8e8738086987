"""Tests for tinygpt_core.data: built-in corpora, files and uploads, download cache, splits, batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tinygpt_core import data
from tinygpt_core.data import (
    Corpus,
    check_split,
    corpus_from_bytes,
    download_corpus,
    get_batch,
    list_builtin_corpora,
    load_corpus,
    split_ids,
)
from tinygpt_core.errors import DataError

SHARED_SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch) -> None:
    # Never read or write the user's real cache from tests.
    monkeypatch.setenv("TINYGPT_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


# --- built-in corpora ------------------------------------------------------------------------


def test_list_builtin_corpora() -> None:
    names = [n for n, _ in list_builtin_corpora()]
    assert names == ["tiny", "induction", "pystdlib", "shakespeare"]
    assert all(desc for _, desc in list_builtin_corpora())


def test_tiny_is_a_short_original_paragraph() -> None:
    c = load_corpus("builtin:tiny")
    assert c.name == "builtin:tiny" and c.source == "builtin:tiny"
    assert 1200 <= c.chars <= 2000
    assert c.text == load_corpus("builtin:tiny").text


def test_induction_has_repeated_halves_and_is_deterministic() -> None:
    c = load_corpus("builtin:induction")
    assert 190_000 <= c.chars <= 210_000
    lines = c.text.splitlines()
    for line in lines[:200]:
        first, second = line.split(" ")
        assert first == second and 10 <= len(first) <= 20 and first.isalpha() and first.islower()
    assert len(set(lines)) > 0.99 * len(lines)  # random strings, not one repeated line
    assert data._induction_text() == c.text  # regenerating gives the same text


@pytest.mark.slow  # parses the whole standard library once (several seconds)
def test_pystdlib_loads_and_is_cached_on_disk(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TINYGPT_CACHE_DIR", str(tmp_path))
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    first = data._pystdlib_text(root)  # built from the source files
    assert 500_000 < len(first) <= data.PYSTDLIB_MAX_CHARS
    assert list(tmp_path.glob("pystdlib-*.txt"))
    assert data._pystdlib_text(root) == first  # read back from the disk cache
    c = load_corpus("builtin:pystdlib")
    assert c.chars > 0 and c.name == "builtin:pystdlib"


def test_stdlib_docstrings_parse_without_executing(tmp_path) -> None:
    lib = tmp_path / "lib"
    (lib / "pkg").mkdir(parents=True)
    (lib / "test").mkdir()
    (lib / "b.py").write_text(
        '"""Module b."""\nraise SystemExit("executed!")\n'
        'class K:\n    """Class K.\n\n    Indented body."""\n    def m(self):\n        """Method m."""\n'
    )
    (lib / "a.py").write_text('"""Module a."""\nimport os\nos._exit(3)\n')
    (lib / "pkg" / "c.py").write_text('if True:\n    def f():\n        """Nested f."""\n')
    (lib / "test" / "t.py").write_text('"""Skipped test file."""\n')
    (lib / "broken.py").write_text("def (:\n")
    text = data._stdlib_docstrings(lib)
    assert text == "Module a.\n\nModule b.\n\nClass K.\n\nIndented body.\n\nMethod m.\n\nNested f.\n\n"
    assert data._stdlib_docstrings(lib, max_chars=12) == text[:12]


def test_shakespeare_builtin_from_env(tmp_path, monkeypatch) -> None:
    f = tmp_path / "shake.txt"
    f.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n")
    monkeypatch.setenv("TINYGPT_SHAKESPEARE", str(f))
    c = load_corpus("builtin:shakespeare")
    assert c.text.startswith("First Citizen:")


@pytest.mark.skipif(not SHARED_SHAKESPEARE.is_file(), reason="shared tinyshakespeare.txt not present")
def test_shakespeare_builtin_from_shared_folder(monkeypatch) -> None:
    monkeypatch.delenv("TINYGPT_SHAKESPEARE", raising=False)
    c = load_corpus("builtin:shakespeare")
    assert c.chars > 1_000_000 and c.text.startswith("First Citizen")


def test_shakespeare_missing_explains_what_to_do(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("TINYGPT_SHAKESPEARE", str(tmp_path / "nope.txt"))
    monkeypatch.setattr(data, "_shakespeare_candidates", lambda: [tmp_path / "nope.txt"])
    with pytest.raises(DataError, match="download"):
        load_corpus("builtin:shakespeare")


def test_unknown_builtin_lists_the_valid_ones() -> None:
    with pytest.raises(DataError) as info:
        load_corpus("builtin:nope")
    assert "builtin:tiny" in str(info.value) and "builtin:pystdlib" in str(info.value)


# --- files and uploads -----------------------------------------------------------------------


def test_load_corpus_from_file(tmp_path) -> None:
    f = tmp_path / "notes.txt"
    f.write_bytes("\ufeffhello wörld\r\n".encode("utf-8"))
    c = load_corpus(str(f))
    assert c == Corpus("notes.txt", "hello wörld\r\n", str(f))  # BOM dropped, line ends kept
    assert c.chars == 13
    assert c.sha256 == __import__("hashlib").sha256("hello wörld\r\n".encode()).hexdigest()


def test_load_corpus_errors(tmp_path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_corpus(str(tmp_path / "missing.txt"))
    with pytest.raises(DataError, match="folder"):
        load_corpus(str(tmp_path))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9 au lait".encode("latin-1"))
    with pytest.raises(DataError) as info:
        load_corpus(str(latin1))
    assert "byte 3" in str(info.value) and "UTF-8" in str(info.value)
    blank = tmp_path / "blank.txt"
    blank.write_text(" \n\t\n")
    with pytest.raises(DataError, match="empty"):
        load_corpus(str(blank))
    big = tmp_path / "big.txt"
    big.write_text("x" * 100)
    with pytest.raises(DataError, match="allowed"):
        load_corpus(str(big), max_bytes=50)
    with pytest.raises(DataError):
        load_corpus("")


def test_corpus_from_bytes_strips_paths() -> None:
    for filename in ("../../etc/passwd", "C:\\Users\\me\\notes.txt", "/tmp/x/notes.txt"):
        c = corpus_from_bytes(filename, b"some text")
        assert "/" not in c.name and "\\" not in c.name and not c.name.startswith(".")
        assert c.source == f"upload:{c.name}"
    assert corpus_from_bytes("C:\\Users\\me\\notes.txt", b"x").name == "notes.txt"
    assert corpus_from_bytes("", b"x").name == "upload.txt"


def test_corpus_from_bytes_errors() -> None:
    with pytest.raises(DataError, match="UTF-8"):
        corpus_from_bytes("a.txt", b"ok \xff\xfe")
    with pytest.raises(DataError, match="empty"):
        corpus_from_bytes("a.txt", b"   ")
    with pytest.raises(DataError, match="limited"):
        corpus_from_bytes("a.txt", b"x" * 11, max_bytes=10)


# --- download --------------------------------------------------------------------------------


def test_download_corpus_caches_and_does_not_download_twice(tmp_path) -> None:
    src = tmp_path / "remote.txt"
    src.write_text("To be, or not to be.\n")
    cache = tmp_path / "cache"
    path = download_corpus("tinyshakespeare", cache_dir=cache, url=src.as_uri())
    assert path == cache / "tinyshakespeare.txt" and path.read_text() == "To be, or not to be.\n"
    src.unlink()  # a second download would now fail
    assert download_corpus("tinyshakespeare", cache_dir=cache, url=src.as_uri()) == path
    assert [p.name for p in cache.iterdir()] == ["tinyshakespeare.txt"]  # no temp files left


def test_download_corpus_default_cache_dir_and_builtin(tmp_path, monkeypatch) -> None:
    src = tmp_path / "remote.txt"
    src.write_text("Cached Shakespeare.\n")
    monkeypatch.setenv("TINYGPT_CACHE_DIR", str(tmp_path / "c"))
    path = download_corpus(url=src.as_uri())
    assert path == tmp_path / "c" / "tinyshakespeare.txt"
    # The shakespeare builtin falls back to the download cache.
    monkeypatch.delenv("TINYGPT_SHAKESPEARE", raising=False)
    monkeypatch.setattr(data, "_shakespeare_candidates", lambda: [data._default_cache_dir() / "tinyshakespeare.txt"])
    assert load_corpus("builtin:shakespeare").text == "Cached Shakespeare.\n"


def test_download_corpus_failure_says_offline(tmp_path) -> None:
    with pytest.raises(DataError, match="offline"):
        download_corpus("tinyshakespeare", cache_dir=tmp_path, url=(tmp_path / "missing.txt").as_uri())
    assert not any(tmp_path.iterdir())
    with pytest.raises(DataError, match="Known corpora"):
        download_corpus("unknown-corpus", cache_dir=tmp_path)
    with pytest.raises(DataError):
        download_corpus("x", cache_dir=tmp_path, url="ftp://example.com/x.txt")


# --- splits and batches ----------------------------------------------------------------------


def test_split_ids_sizes() -> None:
    ids = torch.arange(1000)
    train, val = split_ids(ids)
    assert len(train) == 900 and len(val) == 100
    assert torch.equal(torch.cat([train, val]), ids)
    assert train.dtype == torch.long
    train, val = split_ids(ids, val_fraction=0.25)
    assert (len(train), len(val)) == (750, 250)
    with pytest.raises(DataError):
        split_ids(ids, val_fraction=1.0)


def test_check_split_names_the_numbers() -> None:
    check_split(torch.arange(100), torch.arange(65), block_size=64)
    with pytest.raises(DataError) as info:
        check_split(torch.arange(100), torch.arange(40), block_size=64)
    msg = str(info.value)
    assert "validation" in msg and "40" in msg and "65" in msg and "at most 39" in msg and "longer corpus" in msg
    with pytest.raises(DataError, match="training"):
        check_split(torch.arange(10), torch.arange(100), block_size=64)


def test_get_batch_shapes_and_shift() -> None:
    data_ = torch.arange(500)
    x, y = get_batch(data_, block_size=16, batch_size=8)
    assert x.shape == y.shape == (8, 16)
    assert x.dtype == y.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y, x + 1)  # data is arange, so each target is the next id


def test_get_batch_is_deterministic_with_a_generator() -> None:
    data_ = torch.randint(0, 50, (1000,))
    a = get_batch(data_, 8, 4, generator=torch.Generator().manual_seed(0))
    b = get_batch(data_, 8, 4, generator=torch.Generator().manual_seed(0))
    c = get_batch(data_, 8, 4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_get_batch_exact_length_and_too_short() -> None:
    x, y = get_batch(torch.arange(9), block_size=8, batch_size=3)
    assert torch.equal(x, torch.arange(8).expand(3, 8)) and torch.equal(y, torch.arange(1, 9).expand(3, 8))
    with pytest.raises(DataError):
        get_batch(torch.arange(8), block_size=8, batch_size=2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_get_batch_on_cuda() -> None:
    cpu = get_batch(torch.arange(100), 8, 4, generator=torch.Generator().manual_seed(3))
    for data_ in (torch.arange(100), torch.arange(100, device="cuda")):
        x, y = get_batch(data_, 8, 4, generator=torch.Generator().manual_seed(3), device="cuda")
        assert x.is_cuda and y.is_cuda and torch.equal(x[:, 1:], y[:, :-1])
        assert torch.equal(x.cpu(), cpu[0])  # same windows as on the CPU for the same seed
