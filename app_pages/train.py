"""Train page: choose a corpus, tokenizer and model, start a background job, and watch it learn.

Two views on one page. Without a run in the URL it shows the setup (``app_pages/_train_setup.py``:
corpus, tokenizer, preset or sizes, ablations, training and speed settings, estimates, Start). With
?run=… (and ?job=… when this server runs it) it shows that run (``app_pages/_train_run.py``): live while
it trains, and its outcome once it has ended. Training itself happens in the core's job runner.
"""

from __future__ import annotations

import streamlit as st

from app_pages._common import JOB_PARAM, RUN_PARAM, visitor
from app_pages._train_run import run_view
from app_pages._train_setup import setup_view

visitor()  # keeps this browser's owner token in its cookie (app_pages/_common.py)
_job = st.query_params.get(JOB_PARAM)
_run = st.query_params.get(RUN_PARAM)
if _job or _run:
    run_view(_job, _run)
else:
    setup_view()
