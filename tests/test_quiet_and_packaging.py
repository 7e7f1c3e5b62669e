"""Issue 20.12: the dashboard's and ``memctl serve``'s logs carry no Transformers progress bars (the quiet
defaults are set before the library is imported, in a fresh process, and a model is loaded), and the
package's metadata draws no setuptools deprecation warning."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT, subprocess_env
from tests.fixtures_models import TINY_ID

LOAD = """
import sys
if sys.argv[1] == "quiet":
    from memory_controller.quiet import quiet_library_output
    quiet_library_output()
from transformers import AutoModelForCausalLM, AutoTokenizer
m = AutoModelForCausalLM.from_pretrained(sys.argv[2])
tok = AutoTokenizer.from_pretrained(sys.argv[2])
m.generate(**tok("hello", return_tensors="pt"), max_new_tokens=2)
"""


@pytest.mark.parametrize("mode", ["loud", "quiet"])
def test_loading_a_model_after_the_quiet_defaults_prints_no_progress_bar(hf_settings, mode):
    pytest.importorskip("transformers")
    from memory_controller.catalog import scan_models

    path = next(m.path for m in scan_models(hf_settings).models if m.model_id == TINY_ID)
    env = subprocess_env()
    for key in ("HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY", "TRANSFORMERS_NO_ADVISORY_WARNINGS"):
        env.pop(key, None)
    p = subprocess.run([sys.executable, "-c", LOAD, mode, str(path)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    # the loud run shows the bar this guards against, so the quiet run's silence means something
    assert ("Loading weights" in p.stderr) is (mode == "loud"), p.stderr[-2000:]



def test_pyproject_draws_no_setuptools_deprecation_warning():
    """Issue 20.12: ``license = { text = ... }`` drew setuptools' deprecation warning on every install."""
    import warnings

    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_configuration(Distribution(), ROOT / "pyproject.toml")
    deprecated = [str(w.message) for w in caught if "deprecat" in str(w.message).lower()]
    assert not deprecated, deprecated[0][:300]


@pytest.mark.parametrize("mode", ["loud", "quiet"])
def test_the_transformers_backend_adds_its_librarys_quiet_defaults_only_in_a_quiet_process(mode):
    """The core's quiet switch names no backend: the Transformers backend adds its library's defaults when it
    is built in a quiet process, before the library is imported."""
    code = (
        "import os, sys\n"
        "from memory_controller.quiet import quiet_library_output\n"
        "from memory_controller.settings import load_settings\n"
        "if sys.argv[1] == 'quiet':\n"
        "    quiet_library_output()\n"
        "import backends.transformers as bt\n"
        "bt.create(load_settings(), None)\n"
        "print(os.environ.get('TRANSFORMERS_VERBOSITY'), os.environ.get('HF_HUB_DISABLE_PROGRESS_BARS'),\n"
        "      'transformers' in sys.modules)\n"
    )
    env = subprocess_env()
    for key in ("HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY", "TRANSFORMERS_NO_ADVISORY_WARNINGS"):
        env.pop(key, None)
    p = subprocess.run([sys.executable, "-c", code, mode], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    expected = "error 1 False" if mode == "quiet" else "None None False"
    assert p.stdout.split("\n")[0] == expected, p.stdout
