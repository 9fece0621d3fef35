"""Batch runs over a manifest: validation, executors (local processes, Dask), resume, cohort tables."""

from bml_pipeline.batch.executors import DaskExecutor, LocalExecutor
from bml_pipeline.batch.interrupt import BatchInterrupted, stop_on_signals
from bml_pipeline.batch.manifest import ScanSpec, load_manifest
from bml_pipeline.batch.runner import BatchSummary, run_batch
from bml_pipeline.batch.worker import BatchSettings, ScanOutcome

__all__ = ["BatchInterrupted", "BatchSettings", "BatchSummary", "DaskExecutor", "LocalExecutor", "ScanOutcome",
           "ScanSpec", "load_manifest", "run_batch", "stop_on_signals"]
