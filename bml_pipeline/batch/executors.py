"""Executors: run batch jobs (:class:`~bml_pipeline.batch.worker.Job`: scans, visit pairs) on workers,
results as they finish.

- :class:`LocalExecutor`: a pool of N worker processes (spawn context) on this machine.
- :class:`DaskExecutor`: a Dask distributed cluster, a LocalCluster or an existing scheduler.

Both yield ``(task, outcome)`` pairs in completion order and turn a dead worker into a failed outcome
instead of stopping the batch. Each worker limits BLAS/OpenMP/torch threads (``threads_per_worker``)
so N workers do not oversubscribe the cores, and keeps one loaded segmentation model per process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from bml_pipeline.batch.worker import Job, ScanOutcome

log = logging.getLogger(__name__)

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS",
               "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")
WORKER_DIED = "worker process died while processing this scan (killed or out of memory?)"


class Executor(Protocol):
    """Runs scan tasks; yields ``(task, outcome)`` as each finishes."""

    def run(self, tasks: Sequence[Job]) -> Iterator[tuple[Job, ScanOutcome]]: ...


def thread_env(threads: int) -> dict[str, str]:
    """Environment variables that cap native thread pools at ``threads`` per process."""
    return {name: str(threads) for name in THREAD_VARS}


def parse_devices(device: str) -> tuple[str, ...]:
    """``"cuda:0,cuda:1"`` -> ``("cuda:0", "cuda:1")``: devices handed to workers in turn."""
    devices = tuple(d.strip() for d in device.split(",") if d.strip())
    return devices or ("cpu",)


def _device_of(task: Job) -> str:
    settings = getattr(task, "settings", None)
    return getattr(settings, "device", "auto")


# ---- local processes ---------------------------------------------------------------------------------

_process_device: str | None = None
_started: Any = None  # queue of (subject, visit) keys of scans this process starts


def _init_local_worker(threads: int, devices: tuple[str, ...], counter: Any, started: Any) -> None:
    """Pool initializer: cap torch threads, take the next device in turn, keep the start queue."""
    global _process_device, _started
    _started = started
    with counter.get_lock():
        index = counter.value
        counter.value += 1
    _process_device = devices[index % len(devices)]
    import sys

    if "torch" in sys.modules:  # only when the pipeline already needed it; never import it for nothing
        sys.modules["torch"].set_num_threads(threads)


def _run_local(task: Job) -> ScanOutcome:
    """Entry point in a pool process: announce the start, run the job on this process's device."""
    _started.put(task.key)
    return task.execute(_process_device)


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables (inherited by processes started inside), restore them after."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class LocalExecutor:
    """A pool of ``workers`` processes on this machine (spawn start method: safe with threads and CUDA).

    A worker that dies (killed, out of memory, crash in native code) breaks the pool. When one scan was
    running then, it is recorded as failed; when several were, they are rerun one at a time so that only
    the scan that kills its worker fails. Scans not started yet go to a fresh pool.
    """

    def __init__(self, workers: int = 1, threads_per_worker: int = 1) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self.workers = workers
        self.threads_per_worker = threads_per_worker

    def run(self, tasks: Sequence[Job]) -> Iterator[tuple[Job, ScanOutcome]]:
        queue: list[Job] = list(tasks)
        suspects: list[Job] = []
        while queue or suspects:
            isolated = bool(suspects)
            if isolated:  # one process, so a crash names its scan
                batch, workers, suspects = suspects, 1, []
            else:
                batch, workers, queue = queue, self.workers, []
            broken: list[Job] = []
            running: set[tuple[str, str]] = set()
            yield from self._run_pool(batch, workers, broken, running)
            if not broken:
                continue
            if not running:
                for task in broken:
                    yield task, task.failed("worker process could not start")
                continue
            log.warning("a worker process died; %d unfinished scans go to a fresh pool", len(broken))
            for task in broken:
                if task.key in running and len(running) == 1:
                    yield task, task.failed(WORKER_DIED)
                elif task.key in running or isolated:
                    suspects.append(task)
                else:
                    queue.append(task)

    def _run_pool(self, batch: list[Job], workers: int, broken: list[Job],
                  running: set[tuple[str, str]]) -> Iterator[tuple[Job, ScanOutcome]]:
        """Run ``batch`` in one pool; fill ``broken`` (unfinished when the pool broke) and ``running``
        (keys of scans started but unfinished then)."""
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed
        from concurrent.futures.process import BrokenProcessPool

        context = multiprocessing.get_context("spawn")
        devices = parse_devices(_device_of(batch[0]))
        counter, started = context.Value("i", 0), context.SimpleQueue()
        finished: set[tuple[str, str]] = set()
        with _environ(thread_env(self.threads_per_worker)):  # inherited by the workers spawned here
            pool = ProcessPoolExecutor(
                max_workers=min(workers, len(batch)), mp_context=context, initializer=_init_local_worker,
                initargs=(self.threads_per_worker, devices, counter, started))
            futures = {pool.submit(_run_local, task): task for task in batch}
        try:
            for future in as_completed(futures):
                task = futures[future]
                try:
                    outcome = future.result()
                except BrokenProcessPool:
                    broken.append(task)
                    continue
                except Exception as exc:  # noqa: BLE001 - e.g. an outcome that cannot be unpickled
                    outcome = task.failed(f"{type(exc).__name__}: {exc}")
                finished.add(task.key)
                yield task, outcome
        finally:  # on interruption: drop queued scans instead of waiting for them
            pool.shutdown(wait=True, cancel_futures=True)
        if broken:
            while not started.empty():
                running.add(started.get())
            running -= finished


# ---- Dask ---------------------------------------------------------------------------------------------

class DaskExecutor:
    """Run scans on a Dask distributed cluster.

    Args:
        scheduler: address of a running scheduler (``tcp://host:8786``) or a scheduler file path (ending
            in ``.json``); None starts a LocalCluster of ``workers`` processes for this batch.
        workers: LocalCluster size (ignored with ``scheduler``).
        threads_per_worker: native threads per worker process (LocalCluster).
        gpu: submit segmentation scans with the worker resource ``GPU=1``, so they run only on workers
            started with ``--resources GPU=1`` (one per GPU); measure-only scans run anywhere.
    """

    def __init__(self, scheduler: str | None = None, workers: int = 1, threads_per_worker: int = 1,
                 gpu: bool = False) -> None:
        self.scheduler = scheduler
        self.workers = workers
        self.threads_per_worker = threads_per_worker
        self.gpu = gpu

    @contextlib.contextmanager
    def client(self) -> Iterator[Any]:
        """A connected ``distributed.Client`` (and its LocalCluster when no scheduler was given)."""
        from distributed import Client, LocalCluster

        if self.scheduler is None:
            resources = {"GPU": 1} if self.gpu else None
            with LocalCluster(n_workers=self.workers, threads_per_worker=1, processes=True,
                              dashboard_address=None, env=thread_env(self.threads_per_worker),
                              resources=resources) as cluster, Client(cluster) as client:
                yield client
        elif self.scheduler.endswith(".json"):
            with Client(scheduler_file=self.scheduler) as client:
                yield client
        else:
            with Client(self.scheduler) as client:
                yield client

    def run(self, tasks: Sequence[Job]) -> Iterator[tuple[Job, ScanOutcome]]:
        from distributed import as_completed

        from bml_pipeline.batch.dask_plugin import ModelPreloader, run_task_on_worker

        if not tasks:
            return
        with self.client() as client:
            for model, device in sorted({(t.model, t.settings.device) for t in tasks if t.model is not None}):
                client.register_plugin(ModelPreloader(model, parse_devices(device)), name=f"bml-model-{model}")
            batch_id = uuid.uuid4().hex[:8]
            futures = {}
            for task in tasks:
                resources = {"GPU": 1} if self.gpu and task.model is not None else None
                key = f"bml-{'-'.join(task.key)}-{batch_id}"
                futures[client.submit(run_task_on_worker, task, key=key, resources=resources, pure=False)] = task
            for future in as_completed(futures):
                task = futures[future]
                try:
                    outcome = future.result()
                except Exception as exc:  # noqa: BLE001 - KilledWorker, lost connection ...
                    outcome = task.failed(f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}")
                future.release()
                yield task, outcome
