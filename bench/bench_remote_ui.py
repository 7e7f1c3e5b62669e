"""The dashboard's full script run acting on this process's controller vs through the owner's client.

Run: .venv/bin/python bench/bench_remote_ui.py [--runs 15]
     .venv/bin/python bench/bench_remote_ui.py --local-only --root /path/to/another/checkout   (local figure)

Set-up: a temporary HF cache with two tiny models (tests/model_factory.py), the in-memory backend,
the fake NVML (no GPU), a temporary state dir. "local": no owner runs, the dashboard acts on its own
controller (``dashboard_serves`` off). "through the owner": ``memctl serve --port 0`` runs in another
process with the same settings and one model loaded; the dashboard (AppTest, this process) acts through
its client, every read a request to the control API. The figure is ``_perf_full_run_s`` (app.py's first
line to the end of the dashboard page), median of the runs after one warm-up; the ratio is printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if "--root" in sys.argv:  # measure another checkout with this venv
    ROOT = Path(sys.argv[sys.argv.index("--root") + 1]).resolve()
sys.path.insert(0, str(ROOT))


def _runs(n: int) -> list[float]:
    from streamlit.testing.v1 import AppTest

    from tests.ui_harness import reset_shared_state

    reset_shared_state()
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    out = []
    for _ in range(n):
        at.run()
        assert not at.exception, [e.message for e in at.exception]
        out.append(at.session_state["_perf_full_run_s"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--local-only", action="store_true")
    parser.add_argument("--root", default=None, help="another checkout to measure (the local figure)")
    args = parser.parse_args()
    from tests import model_factory as mf

    with tempfile.TemporaryDirectory() as tmp:
        hub = Path(tmp) / "hub"
        hub.mkdir()
        mf.build_into_cache(hub, "tiny-llama", mf.TINY)
        mf.build_into_cache(hub, "tiny-llama-untied", mf.TINY_UNTIED, seed=1)
        env = {
            "MEMCTL_STATE_DIR": str(Path(tmp) / "state"), "MEMCTL_CONFIG_FILE": str(Path(tmp) / "none.toml"),
            "MEMCTL_BACKENDS": '{"inmem": "tests.inmemory_backend:create"}', "MEMCTL_LOCAL_MODEL_DIRS": "[]",
            "MEMCTL_NVML_MODULE": "tests.fake_pynvml", "MEMCTL_FAKE_NVML": "library_missing",
            "MEMCTL_TEST_SEAMS": "1", "MEMCTL_DASHBOARD_SERVES": "false", "MEMCTL_DOCKER_HOST": "tcp://127.0.0.1:9",
            **mf.hf_env(hub),
        }
        Path(env["MEMCTL_CONFIG_FILE"]).write_text("")
        os.environ.update(env)
        local = _runs(args.runs)
        if args.local_only:
            print(f"dashboard full run ({ROOT}), median of {args.runs}: local {statistics.median(local) * 1000:.0f} ms")
            return

        owner = subprocess.Popen([sys.executable, "-m", "memctl_cli", "serve", "--port", "0"], cwd=ROOT,
                                 env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL, text=True)
        try:
            from memory_controller.settings import load_settings
            from server.connect import connect
            from server.owner import read_owner

            while read_owner(load_settings(), wait_s=60) is None:
                assert owner.poll() is None, "the owner did not start"
                time.sleep(0.1)
            with connect(load_settings()) as client:
                client.apply("inmem", "memctl-test/tiny-llama")
            remote = _runs(args.runs)
        finally:
            owner.terminate()
            owner.wait(30)
    lm, rm = statistics.median(local), statistics.median(remote)
    print(f"dashboard full run, median of {args.runs}: local {lm * 1000:.0f} ms, through the owner "
          f"{rm * 1000:.0f} ms (ratio {rm / lm:.2f})")


if __name__ == "__main__":
    main()
