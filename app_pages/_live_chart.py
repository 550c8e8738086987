"""The Train page's live loss chart: a small Streamlit component (``st.components.v2``) whose SVG is
updated in place by the browser.

Why not ``st.plotly_chart``: in Streamlit 1.67 every refresh of a plotly chart builds and validates a
figure on the server (~100 ms each, per open tab, once a second) and remounts the chart in the browser,
which redraws everything and throws away the user's zoom. This component gets plain lists
(``viz.loss_chart_data``), keeps its DOM and its zoom between refreshes, and costs the server about a
millisecond. The drawing code is ``_live_chart.js``; it sets text with ``textContent`` only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import streamlit as st

_HERE = Path(__file__).with_suffix("")
# Read by tests and the watched-page benchmark: how many points the live chart(s) on a page draw.
POINTS_JS = """() => Array.from(document.querySelectorAll('.tg-live-chart'))
    .reduce((n, el) => n + Number(el.dataset.points || 0), 0)"""

_component = st.components.v2.component(
    "tinygpt_live_loss_chart",
    js=(_HERE.parent / "_live_chart.js").read_text(encoding="utf-8"),
    isolate_styles=False,  # plain DOM (its <style> is scoped by class), so tests can read data-points
)


def live_chart(data: dict[str, Any], *, key: str) -> None:
    """Draw (or update in place) a live chart from ``viz.loss_chart_data(...)``."""
    _component(key=key, data=data, width="stretch")
