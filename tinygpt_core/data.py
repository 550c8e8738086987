"""Get text into the lab and cut it into training batches.

A corpus is the built-in ones (shipped here or generated, all offline), a UTF-8 file on disk, an
upload, or a well-known corpus downloaded once into a local cache. Once tokenised, the ids are
split into train and validation parts and served as random nanoGPT-style windows.
"""

from __future__ import annotations

import ast
import errno
import functools
import hashlib
import os
import platform
import random
import re
import stat
import sys
import sysconfig
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import DataError
from .fileio import write_bytes_atomic

MAX_CORPUS_BYTES = 50_000_000
MAX_UPLOAD_BYTES = 10_000_000
PYSTDLIB_MAX_CHARS = 3_000_000
_PYSTDLIB_FORMAT = 1  # bump when _stdlib_docstrings changes, so stale disk caches are ignored
DOWNLOAD_TIMEOUT_S = 30

KNOWN_DOWNLOADS = {
    "tinyshakespeare": "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
}


# ---------------------------------------------------------------------------------------------
# The corpus type


@dataclass(frozen=True)
class Corpus:
    """A piece of text to train on, with where it came from."""

    name: str  # e.g. "builtin:tiny" or the file name
    text: str
    source: str  # what the user gave: "builtin:tiny", a path, "upload:notes.txt"

    @functools.cached_property
    def sha256(self) -> str:
        """Hex SHA-256 of the UTF-8 text: identifies the exact data a run was trained on."""
        return hashlib.sha256(self.text.encode("utf-8", errors="surrogatepass")).hexdigest()

    @property
    def chars(self) -> int:
        return len(self.text)

    def __repr__(self) -> str:  # the text can be megabytes; keep reprs short
        return f"Corpus(name={self.name!r}, source={self.source!r}, chars={self.chars:,})"


# ---------------------------------------------------------------------------------------------
# Built-in corpora

_TINY_TEXT = """\
The lighthouse on Gull Rock was kept by a woman named Maren Holt, who had lived there for thirty \
winters and knew every sound the tower could make. In the evenings she climbed the one hundred and \
twelve steps with a can of oil in one hand and a lantern in the other, counting them aloud because \
her father had done the same. At the top she trimmed the wick, polished the great lens with a soft \
grey cloth, and waited for the sun to touch the water.

When the light was lit she wrote three lines in the logbook: the hour, the wind, and one thing she \
had seen that day. Most days it was a small thing. A seal asleep on the landing stone. A ship with \
red sails going north. A gull that stole the bread from her window and came back the next morning \
as if nothing had happened. She believed that a keeper who stopped noticing small things would \
soon stop noticing large ones, and the sea did not forgive that.

In the storm of the ninth of March the glass of the lantern room cracked from top to bottom. Maren \
taped it with sailcloth and tar, kept the flame burning through the night, and did not sleep. At \
dawn a fishing boat came round the point with its mast broken and its crew bailing with their \
boots. They had steered all night by her light. The captain climbed the steps to thank her and \
found her asleep in her chair, the logbook open on her knees. On the page for that day she had \
written only one line: the hour, the wind, and the words "the light held."
"""

_BUILTIN_DESCRIPTIONS = {
    "tiny": "One short paragraph (about 1,500 characters) of original prose: small enough to memorise.",
    "induction": "Random letter strings each followed by its repetition (~200 KB): induction heads form here.",
    "pystdlib": "Docstrings of this Python's own standard library (about 2 MB of technical English).",
    "shakespeare": "Tiny Shakespeare (~1 MB) if a local copy exists; run the download helper to fetch it.",
}


def list_builtin_corpora() -> list[tuple[str, str]]:
    """(name without "builtin:", one-line description) for each built-in corpus."""
    return list(_BUILTIN_DESCRIPTIONS.items())


def _induction_text(seed: int = 1337, target_chars: int = 200_000) -> str:
    """Lines "xyz... xyz..." where the second half copies the first.

    The first half of each line is random, so it cannot be predicted; the second half is fully
    predictable, but only by looking back at the first half and copying: the job of an induction
    head. The gap between the two halves of the loss is what the lab shows.
    """
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    lines: list[str] = []
    total = 0
    while total < target_chars:
        s = "".join(rng.choice(letters) for _ in range(rng.randint(10, 20)))
        line = f"{s} {s}\n"
        lines.append(line)
        total += len(line)
    return "".join(lines)


# Parts of the standard library with no prose worth learning from (tests, codec tables, vendored
# or generated files); skipping them also saves parse time.
_STDLIB_SKIP_DIRS = {
    "site-packages",
    "dist-packages",
    "test",
    "tests",
    "idle_test",
    "encodings",
    "pydoc_data",
    "__pycache__",
}


def _stdlib_docstrings(root: Path, max_chars: int = PYSTDLIB_MAX_CHARS) -> str:
    """Concatenate the docstrings of every .py file under ``root``, in sorted path order.

    Files are only parsed (``ast.parse``), never imported or executed. Output is deterministic for a
    given Python version; docstrings that are not valid Unicode (lone surrogates) are dropped.
    """
    files = sorted(p for p in root.rglob("*.py") if not _STDLIB_SKIP_DIRS.intersection(p.relative_to(root).parts))
    parts: list[str] = []
    total = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # old files trigger SyntaxWarnings (invalid escapes, ...)
        for path in files:
            try:
                tree = ast.parse(path.read_bytes(), filename=str(path))
            except (SyntaxError, ValueError, UnicodeDecodeError, OSError, RecursionError, MemoryError):
                continue  # a broken or unreadable file is simply not part of the corpus
            for doc in _docstrings(tree):
                try:
                    doc.encode("utf-8")
                except UnicodeEncodeError:
                    continue
                parts.append(doc + "\n\n")
                total += len(doc) + 2
                if total >= max_chars:
                    return "".join(parts)[:max_chars]
    return "".join(parts)


def _docstrings(tree: ast.Module) -> list[str]:
    """Docstrings of the module, its classes and functions (nested ones too), in source order."""
    out: list[str] = []
    # Walk statements only (never expressions): docstrings live in module, class and def bodies,
    # and those can sit inside if/try/with blocks.
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and doc.strip():
                out.append(doc.strip())
        children = [
            child
            for field in ("body", "orelse", "finalbody", "handlers")
            for child in getattr(node, field, ()) or ()
            if isinstance(child, (ast.stmt, ast.excepthandler))
        ]
        stack.extend(reversed(children))  # reversed so the stack pops them in source order
    return out


def _shakespeare_candidates() -> list[Path]:
    candidates: list[Path] = []
    env = os.environ.get("TINYGPT_SHAKESPEARE")
    if env:
        candidates.append(Path(env).expanduser())
    # The project's shared data folder sits beside the repository checkout.
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt")
    candidates.append(_default_cache_dir() / "tinyshakespeare.txt")
    return candidates


@functools.cache
def _generated_builtin_text(name: str) -> str:
    # Cached for the life of the process (pystdlib is also cached on disk, see _pystdlib_text).
    if name == "tiny":
        return _TINY_TEXT
    if name == "induction":
        return _induction_text()
    if name == "pystdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        if not root.is_dir():
            raise DataError(
                f"This Python has no readable standard library folder at {root}, so builtin:pystdlib "
                "is unavailable. Pick another built-in corpus or a text file."
            )
        return _pystdlib_text(root)
    raise KeyError(name)


def _pystdlib_text(root: Path) -> str:
    """The pystdlib corpus, built once per Python version and then read from the disk cache.

    Parsing the whole standard library takes several seconds; its docstrings only change with the
    Python version, so the result is kept in the cache folder (a cache that cannot be written is
    not an error: the text is then rebuilt by each new process).
    """
    tag = hashlib.sha256(f"{sys.version}|{root}".encode()).hexdigest()[:12]
    cached = _default_cache_dir() / f"pystdlib-{platform.python_version()}-{tag}-v{_PYSTDLIB_FORMAT}.txt"
    try:
        text = cached.read_text(encoding="utf-8")
        if text.strip():
            return text
    except (OSError, UnicodeDecodeError):
        pass  # not cached yet (or unreadable): build it
    text = _stdlib_docstrings(root)
    try:
        write_bytes_atomic(cached, text.encode("utf-8"), fsync=True)
    except OSError:
        pass
    return text


@functools.lru_cache(maxsize=4)
def _read_cached(path: str, mtime_ns: int, size: int) -> str:
    # Keyed on mtime and size so a replaced file is read again.
    return _read_text_file(Path(path), MAX_CORPUS_BYTES)


def builtin_corpus_problem(name: str) -> str | None:
    """Why builtin:NAME cannot be used on this machine (Tiny Shakespeare not downloaded, no readable
    standard library for pystdlib, an unknown name), as the sentence load_corpus would raise; None when
    it can. Cheap: it reads no corpus, so pages can mark missing corpora in their pickers."""
    try:
        _builtin_source(name)
    except DataError as exc:
        return str(exc)
    return None


def _builtin_source(name: str) -> Path | None:
    """Where builtin:NAME's text comes from: a file (Shakespeare), or None (generated); DataError when
    it is not available here."""
    if name not in _BUILTIN_DESCRIPTIONS:
        valid = ", ".join(f"builtin:{n}" for n in _BUILTIN_DESCRIPTIONS)
        raise DataError(f"There is no built-in corpus called {name!r}. The built-in corpora are: {valid}.")
    if name == "shakespeare":
        for path in _shakespeare_candidates():
            if path.is_file():
                return path
        raise DataError(
            "Tiny Shakespeare is not on this machine. Fetch it once with "
            "`python -m tinygpt_core corpora --download tinyshakespeare` "
            "(needs internet), or download input.txt from the char-rnn repository yourself and pass "
            "its path as the corpus (or set TINYGPT_SHAKESPEARE to it)."
        )
    if name == "pystdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        if not root.is_dir():
            raise DataError(
                f"This Python has no readable standard library folder at {root}, so builtin:pystdlib "
                "is unavailable. Pick another built-in corpus or a text file."
            )
    return None


def _load_builtin(name: str) -> Corpus:
    source = f"builtin:{name}"
    path = _builtin_source(name)
    if path is not None:
        st = path.stat()
        return Corpus(source, _read_cached(str(path), st.st_mtime_ns, st.st_size), source)
    return Corpus(source, _generated_builtin_text(name), source)


# ---------------------------------------------------------------------------------------------
# Files and uploads


def load_corpus(source: str, max_bytes: int = MAX_CORPUS_BYTES) -> Corpus:
    """Load ``"builtin:NAME"`` or a UTF-8 text file. Every problem raises ``DataError``."""
    if not isinstance(source, str) or not source.strip():
        raise DataError("No corpus given. Use builtin:NAME (e.g. builtin:tiny) or the path to a UTF-8 text file.")
    source = source.strip()
    if source.startswith("builtin:"):
        return _load_builtin(source[len("builtin:") :].strip().lower())
    path = Path(source).expanduser()
    return Corpus(path.name, _read_text_file(path, max_bytes), source)


# ---------------------------------------------------------------------------------------------
# What a visitor of the app may read: the one check every page's corpus goes through

_NOT_ALLOWED = (
    "That path is not inside a folder this server lets visitors read from{where}. Upload a .txt file, "
    "pick a built-in corpus, or ask whoever runs the lab to put the file in an allowed folder."
)


def _refusal(allowed: tuple[Path, ...]) -> DataError:
    # Names only the operator's allowed folders: never the file asked for, where a link points, or
    # whether it exists, so the refusal cannot be used to probe the rest of the disk.
    where = " (" + ", ".join(str(a) for a in allowed) + ")" if allowed else ""
    return DataError(_NOT_ALLOWED.format(where=where))


def _inside(path: Path, allowed: tuple[Path, ...]) -> bool:
    return any(path != a and path.is_relative_to(a) for a in allowed)


def resolve_visitor_corpus(path: str, allowed: Sequence[str | os.PathLike[str]] | None = None) -> Path:
    """The real path of a file a visitor asked for, if it lies inside an allowed folder; else DataError.

    ``allowed`` defaults to the operator's TINYGPT_CORPUS_DIRS (limits.corpus_dirs); with none, server
    paths are refused outright. Symlinks and ``..`` are resolved before the check, so neither a link
    inside an allowed folder nor ``allowed/../../etc/passwd`` leads out. A relative path is taken
    relative to the allowed folders (the first one where it exists). ``~`` is not expanded.
    """
    from . import limits

    dirs = limits.corpus_dirs() if allowed is None else tuple(Path(a).resolve() for a in allowed)
    if not dirs:
        raise DataError(
            "Training on files of the server is turned off here (whoever runs the lab has not set "
            "TINYGPT_CORPUS_DIRS). Upload a .txt file or pick a built-in corpus."
        )
    text = str(path or "").strip()
    if not text or "\x00" in text:
        raise _refusal(dirs)
    given = Path(text)
    candidates = [given] if given.is_absolute() else [d / given for d in dirs]
    for candidate in candidates:
        real = Path(os.path.realpath(candidate))
        if _inside(real, dirs) and (real.exists() or candidate is candidates[-1]):
            return real
    raise _refusal(dirs)


def load_visitor_corpus(
    source: str | Corpus, allowed: Sequence[str | os.PathLike[str]] | None = None, max_bytes: int = MAX_CORPUS_BYTES
) -> Corpus:
    """A corpus for an app visitor: a Corpus (an upload) or ``builtin:NAME`` as usual, a path only
    through ``resolve_visitor_corpus``. The file is opened without following a final symlink and
    checked again once open (its /proc/self/fd link on Linux), so swapping a link in between does
    not lead out either. The CLI uses ``load_corpus``, which accepts any path."""
    if isinstance(source, Corpus):
        return source
    if isinstance(source, str) and source.strip().startswith("builtin:"):
        return load_corpus(source)
    real = resolve_visitor_corpus(source, allowed)
    from . import limits

    dirs = limits.corpus_dirs() if allowed is None else tuple(Path(a).resolve() for a in allowed)
    label = str(real)
    try:
        fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise DataError(f"Corpus file {label} does not exist. Check the name (and the folder).") from None
    except IsADirectoryError:
        raise DataError(f"{label} is a folder. Give the path of one UTF-8 text file inside it.") from None
    except OSError as e:
        if e.errno == errno.ELOOP:  # the last part became a symlink after the check
            raise _refusal(dirs) from None
        raise DataError(f"Cannot read {label}: {e.strerror or e}.") from None
    with os.fdopen(fd, "rb") as f:
        opened = Path(f"/proc/self/fd/{fd}")
        if opened.exists() and not _inside(Path(os.path.realpath(opened)), dirs):
            raise _refusal(dirs)
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise DataError(f"{label} is a folder. Give the path of one UTF-8 text file inside it.")
        if not stat.S_ISREG(info.st_mode):
            raise DataError(f"{label} is not a regular file. Give the path of a UTF-8 text file.")
        if info.st_size > max_bytes:
            raise DataError(
                f"{label} is {info.st_size:,} bytes, more than the {max_bytes:,} allowed. Use a shorter excerpt of it."
            )
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise DataError(f"{label} is more than the {max_bytes:,} bytes allowed. Use a shorter excerpt of it.")
    return Corpus(real.name, _decode_text(data, label), str(real))


def corpus_from_bytes(filename: str, data: bytes, max_bytes: int = MAX_UPLOAD_BYTES) -> Corpus:
    """Corpus from uploaded bytes; the name is the file's base name with any path removed."""
    name = _sanitise_filename(filename)
    if len(data) > max_bytes:
        raise DataError(
            f"{name} is {len(data):,} bytes; uploads are limited to {max_bytes:,}. "
            "Use a shorter excerpt, or pass the file by path instead."
        )
    return Corpus(name, _decode_text(bytes(data), name), f"upload:{name}")


def _read_text_file(path: Path, max_bytes: int) -> str:
    if not path.exists():
        raise DataError(f"Corpus file {path} does not exist. Check the path (and the working folder).")
    if path.is_dir():
        raise DataError(f"{path} is a folder. Give the path of one UTF-8 text file inside it.")
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise DataError(
                f"{path} is {size:,} bytes, more than the {max_bytes:,} allowed. "
                "Use a shorter excerpt of it (tiny models do not need more)."
            )
        data = path.read_bytes()
    except PermissionError:
        raise DataError(f"No permission to read {path}. Check the file's permissions.") from None
    except OSError as e:
        raise DataError(f"Cannot read {path}: {e.strerror or e}.") from None
    if len(data) > max_bytes:  # the file grew between stat and read
        raise DataError(f"{path} is more than the {max_bytes:,} bytes allowed. Use a shorter excerpt of it.")
    return _decode_text(data, str(path))


def _decode_text(data: bytes, label: str) -> str:
    try:
        # utf-8-sig drops the byte-order mark some Windows editors write at the start.
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{label} is not UTF-8 text: byte {e.start} (0x{data[e.start]:02x}) cannot be decoded. "
            "If it is a text file, open it in an editor and save it again with UTF-8 encoding."
        ) from None
    if not text.strip():
        raise DataError(f"{label} is empty (or only whitespace). Pick a file with some text in it.")
    return text


def _sanitise_filename(filename: str) -> str:
    # Browsers may send full client paths ("C:\\Users\\me\\notes.txt"); keep the last part only,
    # and drop control characters so the name is safe to show and to store.
    base = re.split(r"[\\/]", str(filename or ""))[-1]
    base = "".join(c for c in base if c.isprintable()).strip().lstrip(".")
    return base[:120] or "upload.txt"


# ---------------------------------------------------------------------------------------------
# Download with a local cache


def _default_cache_dir() -> Path:
    env = os.environ.get("TINYGPT_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tinygpt"


def download_corpus(
    name: str = "tinyshakespeare",
    cache_dir: str | os.PathLike[str] | None = None,
    url: str | None = None,
) -> Path:
    """Fetch a well-known corpus once into the cache and return the cached file's path.

    ``url`` overrides the default address for ``name`` (tests use ``file://``). A file already in the
    cache is returned without any network access. The write is atomic, so an interrupted download
    never leaves a truncated corpus behind.
    """
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name or "").strip("._")
    if not safe:
        raise DataError(f"Invalid corpus name {name!r}; use letters, digits, '-', '_' or '.'.")
    if url is None:
        if name not in KNOWN_DOWNLOADS:
            known = ", ".join(KNOWN_DOWNLOADS)
            raise DataError(f"No download address is known for {name!r}. Known corpora: {known}; or pass url=.")
        url = KNOWN_DOWNLOADS[name]
    if urllib.parse.urlsplit(url).scheme not in ("http", "https", "file"):
        raise DataError(f"Cannot download from {url!r}: only http, https and file addresses are supported.")

    cache = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_dir()
    target = cache / f"{safe}.txt"
    if target.is_file() and target.stat().st_size > 0:
        return target

    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as resp:
            data = resp.read(MAX_CORPUS_BYTES + 1)
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise DataError(
            f"Could not download {name!r} from {url} ({reason}). This machine may be offline. "
            f"Download the file elsewhere and pass its path as the corpus, or copy it to {target}."
        ) from None
    if len(data) > MAX_CORPUS_BYTES:
        raise DataError(f"The download from {url} is larger than {MAX_CORPUS_BYTES:,} bytes; refusing to cache it.")
    _decode_text(data, url)  # refuse to cache something that is not usable text

    try:
        write_bytes_atomic(target, data, fsync=True)
    except OSError as e:
        raise DataError(
            f"Cannot write to the cache folder {cache}: {e.strerror or e}. Set TINYGPT_CACHE_DIR to a writable folder."
        ) from None
    return target


# ---------------------------------------------------------------------------------------------
# Splits and batches


def split_ids(ids: torch.Tensor, val_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """First (1 - val_fraction) of the ids for training, the rest for validation.

    A contiguous split (not a shuffle) so validation text is text the model never saw, not
    overlapping windows of training text.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"The validation fraction must be at least 0 and below 1, got {val_fraction}.")
    ids = torch.as_tensor(ids).reshape(-1).long()
    n_train = int(len(ids) * (1.0 - val_fraction))
    return ids[:n_train], ids[n_train:]


def check_split(train: torch.Tensor, val: torch.Tensor, block_size: int) -> None:
    """Raise ``DataError`` unless both splits hold at least one full window (block_size + 1 ids)."""
    need = block_size + 1
    for label, part in (("training", train), ("validation", val)):
        n = len(part)
        if n < need:
            largest = max(n - 1, 0)
            hint = f"a context (block size) of at most {largest}" if largest >= 1 else "a much smaller context"
            raise DataError(
                f"The {label} split has {n:,} tokens, but a context of {block_size} needs at least {need:,}. "
                f"Use {hint}, or a longer corpus."
            )


def get_batch(
    data: torch.Tensor,
    block_size: int,
    batch_size: int,
    generator: torch.Generator | None = None,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows: x is (batch_size, block_size) and y is x shifted one token to the left."""
    n = len(data)
    if n < block_size + 1:
        raise DataError(
            f"The data has {n:,} tokens, fewer than one window of {block_size + 1}. "
            "Use a smaller context or a longer corpus."
        )
    # Start positions come from the (CPU) generator, so a seeded run draws the same windows on
    # every device.
    starts = torch.randint(n - block_size, (batch_size,), generator=generator).to(data.device)
    # One gather of (B, T+1) windows instead of B slices, then the two shifted views.
    windows = data[starts[:, None] + torch.arange(block_size + 1, device=data.device)].long()
    x, y = windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
    target = torch.device(device)
    if target.type == "cuda" and x.device.type == "cpu":
        # Pinned host memory lets the copy overlap with the GPU's work on the previous step.
        x = x.pin_memory().to(target, non_blocking=True)
        y = y.pin_memory().to(target, non_blocking=True)
    elif x.device != target:
        x, y = x.to(target), y.to(target)
    return x, y
