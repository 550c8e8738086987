"""The Train page's live run board: progress, metric cards and samples in one small Streamlit component
(``st.components.v2``) that the browser updates in place.

Why not ``st.progress``/``st.metric``/``st.code``: a fragment refreshing once a second makes the browser
re-create each of those elements every time, and with three tabs watching that cost headless Chromium
about a third of a core on a 2-core machine that is also training (issue 10; measured before this board,
in the git history of bench/RESULTS.md). The board keeps its DOM and touches only what changed.
``_live_board.js`` draws it with ``textContent`` only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import streamlit as st

_component = st.components.v2.component(
    "tinygpt_live_board",
    js=Path(__file__).with_suffix(".js").read_text(encoding="utf-8"),
    isolate_styles=False,  # plain DOM, its <style> scoped by class, so tests can read it
)


def live_board(data: dict[str, Any], *, key: str) -> None:
    """Draw (or update in place) a board: any of progress, metrics, facts and samples (see the .js)."""
    _component(key=key, data=data, width="stretch")
