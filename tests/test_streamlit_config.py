"""The served app's Streamlit settings that performance and safety depend on (.streamlit/config.toml)."""

from __future__ import annotations

import tomllib
from pathlib import Path

CONFIG = Path(__file__).resolve().parent.parent / ".streamlit" / "config.toml"


def test_a_served_lab_watches_no_files_runs_no_gc_per_script_and_sends_no_telemetry():
    cfg = tomllib.loads(CONFIG.read_text(encoding="utf-8"))
    # watching .venv's modules slowed decoding 2-3x in the browser; a full gc per rerun stalled tabs
    assert cfg["server"]["fileWatcherType"] == "none" and cfg["server"]["runOnSave"] is False
    assert cfg["runner"]["postScriptGC"] is False
    assert cfg["browser"]["gatherUsageStats"] is False
