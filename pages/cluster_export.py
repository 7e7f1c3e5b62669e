""""🚢 Экспорт для кластера": the selected model sized for cluster GPUs (memory per GPU, GPU count), with the
two downloads `memctl export` prints — Helm values for vLLM production-stack and a KubeRay RayService.

The numbers come from ``ctl.export`` (the workstation's estimator and fit, see memory_controller/clusterfit.py);
this section only renders them. Nothing is deployed.
"""

from __future__ import annotations

from typing import Any

import streamlit as st

from memory_controller.clusterfit import DoesNotFitError, default_gpu
from memory_controller.errors import MemctlError
from memory_controller.units import GIB, fmt_bytes
from pages import ui_common as ui

DOWNLOADS = (("production-stack", "cluster.download_helm"), ("rayservice", "cluster.download_ray"))


def _note(t: Any, note: Any) -> str:
    key = f"cluster.notes.{note.code.removeprefix('export.')}"
    return t(key, **dict(note.args)) if t.has(key) else ui.render(note)


def cluster_export(ctl: Any, snap: Any, model_id: str | None) -> None:
    t = ui.tr()
    with st.expander(t("cluster.title"), expanded=False):
        if not model_id:
            st.info(t("cluster.no_model"))
            return
        formats = ui.run_safely(ctl.export_formats) or ()
        wanted = [(fmt, label) for fmt, label in DOWNLOADS if fmt in formats]
        if not wanted:
            st.info(t("cluster.no_exporter"))
            return
        local = default_gpu(snap)
        local_gib = round(local[0] / GIB) if local else 24
        c1, c2 = st.columns(2)
        gib = c1.number_input(t("cluster.gpu_memory"), min_value=1, max_value=4096, value=local_gib, step=1,
                              key="cluster_gpu_gib")
        gpus = c2.number_input(t("cluster.gpus"), min_value=1, max_value=64, value=1, step=1, key="cluster_gpus")
        gpu_bytes = None if local and int(gib) == local_gib else int(gib) * GIB  # this GPU: its exact size, its name
        results = []
        for fmt, label in wanted:
            try:
                results.append((label, ctl.export(fmt, model_id, gpu_bytes=gpu_bytes, gpus=int(gpus))))
            except DoesNotFitError as exc:
                more = exc.args_.get("gpus_that_fit")
                st.warning(t("cluster.does_not_fit", model=model_id, gpus=int(gpus), gib=int(gib))
                           + (" " + t("cluster.try_gpus", n=more) if more else ""))
                st.caption(exc.message)
                return
            except MemctlError as exc:
                ui.error_box(exc, context=t("cluster.cannot", model=model_id))
                return
        fit, util = results[0][1].fit, results[0][1].gpu_util
        st.caption(t("cluster.intro"))
        st.markdown(t("cluster.summary", context=fit.context_tokens, seqs=fit.profile.batch, util=f"{util:.2f}",
                      per_gpu=fmt_bytes(fit.per_gpu_bytes), gpus=fit.gpus, gib=fmt_bytes(fit.gpu_bytes)))
        for note in results[0][1].notes:
            st.caption(f"ℹ️ {ui.sentence(_note(t, note))}")
        for col, (label, result) in zip(st.columns(len(results)), results, strict=True):
            col.download_button(t(label), result.text, file_name=result.file_name, mime="application/x-yaml",
                                key=f"cluster_{result.fmt}")
        st.caption(t("cluster.how"))
