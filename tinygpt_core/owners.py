"""Who a run belongs to, and who may manage it (stop, resume, delete).

Everyone can open, compare and sample every run; only its owner (or the operator) may manage it.
The rule lives in one function, ``can_manage``; pages ask it, never decide themselves.

Identities are opaque strings:

- ``visitor:<hash>``: a browser of the app. The app keeps a random token in a cookie of that browser
  (see app_pages/_common.py) and only its hash is ever written next to a run, so nothing on disk, in a
  run zip or in a log lets anyone act as that visitor.
- ``user:<hash>``: someone signed in through Streamlit's own login (``st.login``); the hash of their
  stable account id (``sub``, else e-mail).
- no owner recorded (None): a run made by the CLI, a notebook, or an older lab. It belongs to the
  machine's user, so in the app only the operator may manage it.

The operator unlocks managing every run with ``TINYGPT_ADMIN_PASSWORD`` (compared in constant time;
unset: nobody is operator in the app).
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import json
import os
import re
import secrets
import threading
import time
from pathlib import Path

from .fileio import write_bytes_atomic

OWNER_FILE = "owner.json"
ADMIN_PASSWORD_VAR = "TINYGPT_ADMIN_PASSWORD"
TOKEN_BYTES = 24
_TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{32,64}$")  # what new_token() makes (base64url of 24 bytes = 32 chars)
_OWNER_RE = re.compile(r"^(visitor|user):[0-9a-f]{64}$")


def new_token() -> str:
    """A fresh random secret for one browser (URL- and cookie-safe)."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def valid_token(token: object) -> bool:
    """Whether ``token`` looks like one new_token made (anything else from a cookie is ignored)."""
    return isinstance(token, str) and bool(_TOKEN_RE.match(token))


def _digest(kind: str, secret: str) -> str:
    # Domain-separated, so a visitor token can never collide with a login id.
    return f"{kind}:" + hashlib.sha256(f"tinygpt-lab/{kind}/{secret}".encode()).hexdigest()


def visitor_owner(token: str) -> str:
    """The owner id of a browser holding ``token`` (its hash: the token itself is never stored)."""
    if not valid_token(token):
        raise ValueError("not a visitor token")
    return _digest("visitor", token)


def user_owner(account_id: str) -> str:
    """The owner id of someone signed in with Streamlit's login (``st.user``'s sub or e-mail)."""
    if not isinstance(account_id, str) or not account_id.strip():
        raise ValueError("an account id is needed")
    return _digest("user", account_id.strip())


def can_manage(run_owner: str | None, visitor: str | None, is_admin: bool = False) -> bool:
    """The one permission rule: may ``visitor`` stop, resume or delete a run owned by ``run_owner``?

    The operator may manage every run. A run with no recorded owner (made by the CLI) belongs to the
    machine's user, so nobody else may. Otherwise only the same owner id may (compared in constant time).
    """
    if is_admin:
        return True
    if not run_owner or not visitor:
        return False
    return hmac.compare_digest(run_owner.encode(), visitor.encode())


def admin_password_set() -> bool:
    return bool(os.environ.get(ADMIN_PASSWORD_VAR, ""))


def check_admin_password(given: str) -> bool:
    """True when ``given`` is the operator password (TINYGPT_ADMIN_PASSWORD); False when unset.

    Both sides are hashed first, so the comparison takes the same time whatever the lengths.
    """
    expected = os.environ.get(ADMIN_PASSWORD_VAR, "")
    if not expected or not isinstance(given, str):
        return False
    a = hashlib.sha256(given.encode("utf-8", "surrogatepass")).digest()
    b = hashlib.sha256(expected.encode("utf-8", "surrogatepass")).digest()
    return hmac.compare_digest(a, b)


# Guessing the password through the app: every wrong try costs a second, and the whole server accepts
# at most ADMIN_TRIES_PER_MINUTE wrong tries a minute (a new browser session does not reset it).
ADMIN_TRIES_PER_MINUTE = 10
WRONG_PASSWORD_DELAY_S = 1.0
_failures: collections.deque[float] = collections.deque()
_failures_lock = threading.Lock()


def admin_login(given: str) -> bool:
    """check_admin_password, rate-limited for a server open to visitors: False while too many wrong tries."""
    now = time.monotonic()
    with _failures_lock:
        while _failures and now - _failures[0] > 60:
            _failures.popleft()
        if len(_failures) >= ADMIN_TRIES_PER_MINUTE:
            return False
    if check_admin_password(given):
        return True
    with _failures_lock:
        _failures.append(now)
    time.sleep(WRONG_PASSWORD_DELAY_S)
    return False


def read_owner(run_dir: str | os.PathLike[str]) -> str | None:
    """The owner recorded in a run folder; None when there is none (or it is unreadable or malformed:
    then only the operator may manage the run, the safe side)."""
    try:
        data = json.loads((Path(run_dir) / OWNER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    owner = data.get("owner") if isinstance(data, dict) else None
    return owner if isinstance(owner, str) and _OWNER_RE.match(owner) else None


def write_owner(run_dir: str | os.PathLike[str], owner: str) -> None:
    """Record ``owner`` (an id from visitor_owner/user_owner) in the run folder, atomically."""
    if not isinstance(owner, str) or not _OWNER_RE.match(owner):
        raise ValueError(f"not an owner id: {owner!r}")
    write_bytes_atomic(Path(run_dir) / OWNER_FILE, json.dumps({"owner": owner}).encode("utf-8"))


__all__ = [
    "OWNER_FILE",
    "new_token",
    "valid_token",
    "visitor_owner",
    "user_owner",
    "can_manage",
    "admin_password_set",
    "check_admin_password",
    "admin_login",
    "read_owner",
    "write_owner",
]
