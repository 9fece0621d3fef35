"""Dask worker side: a plugin that gives each worker its device and a loaded model, and the task entry.

Imported only by :class:`~bml_pipeline.batch.executors.DaskExecutor` (and by Dask workers when they
unpickle the plugin), so ``distributed`` is never imported for local runs.
"""

from __future__ import annotations

import logging
from typing import Any

from bml_pipeline.batch.worker import Job, ScanOutcome

log = logging.getLogger(__name__)

_worker_device: str | None = None


def run_task_on_worker(task: Job) -> ScanOutcome:
    """Dask task: the job on the device :class:`ModelPreloader` gave this worker (if any)."""
    return task.execute(_worker_device)


def _plugin_base() -> type:
    from distributed.diagnostics.plugin import WorkerPlugin

    return WorkerPlugin


class ModelPreloader(_plugin_base()):  # type: ignore[misc]
    """Worker plugin: pick this worker's device and load the segmentation model once per worker process.

    Worker ``i`` (a LocalCluster names its workers 0, 1, ...) takes ``devices[i % len(devices)]``; workers
    with other names take the first device. With one GPU visible per worker (dask-cuda, or
    ``CUDA_VISIBLE_DEVICES`` set in the job script), ``cuda`` is that worker's GPU. The predictor stays in
    :func:`bml_pipeline.pipeline.load_predictor`'s per-process cache for every later scan.
    """

    idempotent = True

    def __init__(self, model: str, devices: tuple[str, ...]) -> None:
        self.model = model
        self.devices = devices

    def setup(self, worker: Any) -> None:
        global _worker_device
        index = worker.name if isinstance(worker.name, int) else 0
        _worker_device = self.devices[index % len(self.devices)]
        from bml_pipeline.pipeline import load_predictor

        try:
            load_predictor(self.model, _worker_device)
        except Exception as exc:  # noqa: BLE001 - scans that need the model report the reason themselves
            log.warning("worker %s could not preload model %s: %s", worker.name, self.model, exc)
