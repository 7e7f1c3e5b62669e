"""The GPU acceptance check (``scripts/gpu-check.sh``): memctl's memory figures against NVML and a real load.

Builds its own random-weight models offline (a ~1.5 B Qwen2-style GQA model with tied embeddings and a
~3 B Llama-style untied one; much smaller shapes of the same architectures on a machine without a GPU),
drives memctl only through its public surface (:mod:`bench.gpu_check.adapter`: ``MemoryController`` and
the ``memctl`` CLI) and prints one table: check, expected, measured, verdict.

Modules: ``table`` (rows, verdicts, rendering, exit code), ``models`` (the model builder),
``measure`` (NVML and host-memory readings, the peak sampler, a ballast process),
``adapter`` (every controller/CLI call), ``cpu_checks`` / ``gpu_checks`` (the rows), ``__main__``.
"""
