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
from streamlit import config as _st_config  # noqa: E402

# Streamlit runs a full gc.collect() after every script run, fragment ticks included: with the live
# panel ticking every poll_interval_s that was ~70 ms of CPU per tick, most of an idle tab's cost
# (issue 12.8), and it grows with the heap (an in-process model). Python's own generational GC
# still runs.
_st_config.set_option("runner.postScriptGC", False)

from memory_controller.errors import SettingsError  # noqa: E402
from memory_controller.quiet import quiet_library_output  # noqa: E402

quiet_library_output()  # no "Loading weights" bars or token-id warnings in the dashboard's log
from pages import ui_common as ui  # noqa: E402

st.session_state["_perf_t0"] = _T0

st.set_page_config(page_title="memctl", page_icon="🧠", layout="wide", initial_sidebar_state="expanded")

try:
    ctl = ui._controller()
except SettingsError as settings_exc:
    # Still declare the pages: without st.navigation Streamlit would list pages/*.py (helper modules
    # included) in the sidebar. One page says what is wrong with the settings.
    ui.init_language()
    t = ui.tr()
    bad_settings = settings_exc  # the ``except`` name is unbound when the block ends

    def settings_error_page() -> None:
        ui.settings_error(bad_settings)

    st.navigation([st.Page(settings_error_page, title=t("nav.settings_error"), icon="❌",
                           url_path="settings-error", default=True)]).run()
    st.stop()

ui.init_language(ctl.settings.language)
t = ui.tr()
# The dashboard owns the machine (settings.dashboard_serves): once per process the controller is paired
# with the memctl server on a background thread, or with a live owner elsewhere (``memctl serve``),
# whose client every page then acts on (ui.controller()).
ui.ownership()

page = st.navigation([
    st.Page("pages/dashboard.py", title=t("nav.dashboard"), icon="🧠", url_path="dashboard", default=True),
    st.Page("test_memory_controller.py", title=t("nav.diagnostics"), icon="🧪", url_path="diagnostics"),
])
page.run()
