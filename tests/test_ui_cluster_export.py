"""The "🚢 Экспорт для кластера" section: the two downloads for the selected model, with the numbers
``ctl.export`` (and so ``memctl export``) gives, and the does-not-fit warning with the GPU count that fits."""

from __future__ import annotations

from memory_controller.units import GIB
from tests import model_factory as mf
from tests.test_export import MODEL, QWEN7
from tests.ui_harness import app_factory, controller, texts  # noqa: F401

TITLE = "🚢 Экспорт для кластера"


def _section(at):
    return next(e for e in at.expander if e.label == TITLE)


def test_cluster_export_offers_both_files_with_memctls_numbers(app_factory, tmp_path):  # noqa: F811
    hub = tmp_path / "hub"
    mf.sparse_into_cache(hub, "qwen2-7b", QWEN7, config={"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]})
    at = app_factory(scenario="one_gpu", hub=hub)
    at.selectbox(key="f_model").set_value(MODEL).run()
    assert not at.exception, [e.message for e in at.exception]
    section = _section(at)
    labels = [b.label for b in section.get("download_button")]
    assert labels == ["⬇️ values.yaml (vLLM production-stack)", "⬇️ rayservice.yaml (KubeRay)"]

    at.number_input(key="cluster_gpu_gib").set_value(80).run()
    expected = controller().export("production-stack", MODEL, gpu_bytes=80 * GIB)
    summary = "\n".join(m.value for m in _section(at).markdown)
    assert f"Контекст **{expected.fit.context_tokens}** токенов" in summary
    assert f"gpu_memory_utilization **{expected.gpu_util:.2f}**" in summary
    assert f"одновременно: **{expected.fit.profile.batch}**" in summary

    at.number_input(key="cluster_gpu_gib").set_value(12).run()
    assert not at.exception
    assert "не помещается на 1 × 12 GiB" in texts(at) and "укажите 2 GPU" in texts(at)
    assert not _section(at).get("download_button")
