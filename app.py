"""memctl dashboard: ``streamlit run app.py`` (or ``bash scripts/run.sh``) → http://127.0.0.1:8501.

The entry file only frames the pages: page config, the one shared controller (``st.cache_resource``
in pages/ui_common.py), the session's language, and ``st.navigation``. It imports none of the
outside systems (torch, docker, pynvml, psutil): the first paint never waits for torch, which is
imported only when the user loads a Transformers model.
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()  # the bench reads the script's own run time (bench/bench_ui.py)

import streamlit as st  # noqa: E402

from pages import ui_common as ui  # noqa: E402

st.session_state["_perf_t0"] = _T0

st.set_page_config(page_title="memctl", page_icon="🧠", layout="wide", initial_sidebar_state="expanded")

ctl = ui.controller()
ui.init_language(ctl.settings.language)
t = ui.tr()

page = st.navigation([
    st.Page("pages/dashboard.py", title=t("nav.dashboard"), icon="🧠", url_path="dashboard", default=True),
    st.Page("test_memory_controller.py", title=t("nav.diagnostics"), icon="🧪", url_path="diagnostics"),
])
page.run()
