"""Executors: run batch jobs (:class:`~bml_pipeline.batch.worker.Job`: scans, visit pairs) on workers,
results as they finish.

- :class:`LocalExecutor`: a pool of N worker processes (spawn context) on this machine.
- :class:`DaskExecutor`: a Dask distributed cluster, a LocalCluster or an existing scheduler.

Both yield ``(task, outcome)`` pairs in completion order and turn a dead worker into a failed outcome
instead of stopping the batch. Each worker limits BLAS/OpenMP/torch threads (``threads_per_worker``)
so N workers do not oversubscribe the cores, and keeps one loaded segmentation model per process.

Interrupted (an exception in the caller, e.g. :class:`~bml_pipeline.batch.interrupt.BatchInterrupted`
on SIGINT/SIGTERM, while a run is in progress or the executor's context is left with an exception),
an executor stops at once: queued jobs are cancelled, the local worker processes are terminated (killed
after a short grace period), a LocalCluster is closed; finished jobs are kept. Local workers ignore
SIGINT (a Ctrl-C reaches the whole process group; the batch process stops them itself) and exit by
themselves when the batch process is gone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from bml_pipeline.batch.interrupt import stop_processes
from bml_pipeline.batch.worker import Job, ScanOutcome, error_line

log = logging.getLogger(__name__)

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS",
               "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")
WORKER_DIED = "worker process died while processing this scan (killed or out of memory?)"
TERMINATE_GRACE_S = 3.0
"""Seconds an interrupted batch gives its worker processes to exit on SIGTERM before killing them."""
CLOSE_TIMEOUT_S = 10
"""Seconds allowed to close a Dask client or LocalCluster."""
DASK_LOGGERS = ("distributed", "dask")
"""Dask's loggers; ``bml-pipeline batch`` keeps them at WARNING unless ``--verbose`` (their INFO lines flood a
terminal: one per worker start, connection, plugin ...)."""
DASK_LOG_ENV = "DASK_LOGGING__DISTRIBUTED"
"""Dask config variable (``logging.distributed``) read when ``distributed`` is imported, here and in the
worker processes a LocalCluster starts (they inherit it)."""
_dask_log_level: int | None = None  # None: leave Dask's own logging configuration alone


class Executor(Protocol):
    """Runs jobs; yields ``(job, outcome)`` as each finishes. As a context manager it keeps its workers
    between :meth:`run` calls."""

    def __enter__(self) -> Executor: ...  # noqa: PYI034

    def __exit__(self, *exc: object) -> None: ...

    def run(self, tasks: Sequence[Job]) -> Iterator[tuple[Job, ScanOutcome]]: ...


def set_dask_log_level(level: int) -> None:
    """Level of Dask's loggers (:data:`DASK_LOGGERS`) in this process, now and after ``distributed`` is
    imported (its import sets ``distributed`` to INFO from its config), and in the worker processes of a
    LocalCluster started from here (through :data:`DASK_LOG_ENV`, which they inherit)."""
    global _dask_log_level
    _dask_log_level = level
    os.environ[DASK_LOG_ENV] = logging.getLevelName(level).lower()
    apply_dask_log_level()


def apply_dask_log_level() -> None:
    """Set Dask's loggers to the level chosen with :func:`set_dask_log_level` (no-op when none was)."""
    if _dask_log_level is not None:
        for name in DASK_LOGGERS:
            logging.getLogger(name).setLevel(_dask_log_level)


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


def _init_local_worker(threads: int, devices: tuple[str, ...], counter: Any, started: Any,
                       parent: int) -> None:
    """Pool initializer: ignore SIGINT, exit with the batch process, cap torch threads, take the next
    device in turn, keep the start queue."""
    global _process_device, _started
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the batch process decides and stops its workers
    threading.Thread(target=_exit_with_parent, args=(parent,), name="bml-parent-watch", daemon=True).start()
    _started = started
    with counter.get_lock():
        index = counter.value
        counter.value += 1
    _process_device = devices[index % len(devices)]
    import sys

    if "torch" in sys.modules:  # only when the pipeline already needed it; never import it for nothing
        sys.modules["torch"].set_num_threads(threads)


def _exit_with_parent(parent: int, interval_s: float = 0.5) -> None:
    """Worker thread: end this worker process when the batch process is gone (killed with SIGKILL, say),
    so that no orphaned worker goes on processing or idles holding memory. Jobs write atomically and
    their completion marker last, so exiting at any point leaves nothing that looks finished."""
    while True:
        time.sleep(interval_s)
        if os.getppid() != parent:
            os._exit(1)


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


class _Pool:
    """A spawn-context process pool whose workers report each job they start."""

    def __init__(self, workers: int, threads: int, devices: tuple[str, ...]) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        context = multiprocessing.get_context("spawn")
        self.threads = threads
        self.started = context.SimpleQueue()
        self.finished: set[tuple[str, str]] = set()
        self.executor = ProcessPoolExecutor(
            max_workers=workers, mp_context=context, initializer=_init_local_worker,
            initargs=(threads, devices, context.Value("i", 0), self.started, os.getpid()))

    def submit_all(self, batch: Sequence[Job]) -> dict[Any, Job]:
        with _environ(thread_env(self.threads)):  # inherited by the workers spawned here
            return {self.executor.submit(_run_local, task): task for task in batch}

    def running(self) -> set[tuple[str, str]]:
        """Keys of jobs started in this pool and not finished."""
        keys = set()
        while not self.started.empty():
            keys.add(self.started.get())
        return keys - self.finished

    def close(self, cancel: bool = False) -> None:
        self.executor.shutdown(wait=True, cancel_futures=cancel)

    def terminate(self, grace_s: float = TERMINATE_GRACE_S) -> None:
        """Stop now: cancel queued jobs, SIGTERM the worker processes, SIGKILL those still alive after
        ``grace_s``, and wait for the pool's manager thread to end."""
        executor = self.executor
        processes = list((getattr(executor, "_processes", None) or {}).values())
        manager = getattr(executor, "_executor_manager_thread", None)
        executor.shutdown(wait=False, cancel_futures=True)
        stop_processes(processes, grace_s)
        if manager is not None and manager.is_alive():
            manager.join(grace_s)


class LocalExecutor:
    """A pool of ``workers`` processes on this machine (spawn start method: safe with threads and CUDA).

    Used as a context manager, the pool stays up between :meth:`run` calls (scans, then visit pairs);
    otherwise each call starts and stops its own. ``workers=0`` runs every job in the calling process,
    one after another (for debugging and tiny batches: no isolation from crashes in native code).

    A worker that dies (killed, out of memory, crash in native code) breaks the pool. When one job was
    running then, it is recorded as failed; when several were, they are rerun one at a time so that only
    the job that kills its worker fails. Jobs not started yet go to a fresh pool.

    An exception in the caller while a run is in progress (or on leaving the context) terminates every
    worker process at once (:meth:`terminate`): queued jobs are dropped, running ones are killed.
    """

    def __init__(self, workers: int = 1, threads_per_worker: int = 1) -> None:
        if workers < 0:
            raise ValueError("workers must be 0 (in this process) or more")
        self.workers = workers
        self.threads_per_worker = threads_per_worker
        self._keep = False
        self._pool: _Pool | None = None
        self._pools: list[_Pool] = []  # every pool not closed yet (the shared one, an isolation pool)

    def __enter__(self) -> LocalExecutor:  # noqa: PYI034
        self._keep = True
        return self

    def __exit__(self, exc_type: object = None, *exc: object) -> None:
        self._keep = False
        if exc_type is not None:
            self.terminate()
        elif self._pool is not None:
            self._close(self._pool)
        self._pool = None

    def terminate(self) -> None:
        """Cancel queued jobs and terminate every worker process now (interrupted batch)."""
        pools, self._pools, self._pool = self._pools, [], None
        for pool in pools:
            pool.terminate()

    def _new_pool(self, workers: int, devices: tuple[str, ...]) -> _Pool:
        pool = _Pool(workers, self.threads_per_worker, devices)
        self._pools.append(pool)
        return pool

    def _close(self, pool: _Pool, cancel: bool = False) -> None:
        pool.close(cancel=cancel)
        with contextlib.suppress(ValueError):
            self._pools.remove(pool)

    def run(self, tasks: Sequence[Job]) -> Iterator[tuple[Job, ScanOutcome]]:
        if self.workers == 0:
            for task in tasks:
                yield task, task.execute(parse_devices(_device_of(task))[0])
            return
        queue: list[Job] = list(tasks)
        suspects: list[Job] = []
        try:
            while queue or suspects:
                isolated = bool(suspects)
                if isolated:  # one process, so a crash names its job
                    batch, suspects = suspects, []
                    pool = self._new_pool(1, parse_devices(_device_of(batch[0])))
                else:
                    batch, queue = queue, []
                    if self._pool is None:
                        self._pool = self._new_pool(self.workers, parse_devices(_device_of(batch[0])))
                    pool = self._pool
                broken: list[Job] = []
                yield from self._run_pool(pool, batch, broken)
                if isolated:
                    self._close(pool)
                if not broken:
                    continue
                running = pool.running()
                if not isolated:
                    self._pool = None
                self._close(pool)
                if not running:
                    for task in broken:
                        yield task, task.failed("worker process could not start")
                    continue
                log.warning("a worker process died; %d unfinished jobs go to a fresh pool", len(broken))
                for task in broken:
                    if task.key in running and len(running) == 1:
                        yield task, task.failed(WORKER_DIED)
                    elif task.key in running or isolated:
                        suspects.append(task)
                    else:
                        queue.append(task)
        except BaseException:  # interrupted: drop queued jobs and stop the workers instead of waiting
            self.terminate()
            raise
        if not self._keep and self._pool is not None:
            self._close(self._pool)
            self._pool = None

    @staticmethod
    def _run_pool(pool: _Pool, batch: list[Job], broken: list[Job]) -> Iterator[tuple[Job, ScanOutcome]]:
        """Run ``batch`` in ``pool``; jobs unfinished when the pool broke go to ``broken``."""
        from concurrent.futures import as_completed
        from concurrent.futures.process import BrokenProcessPool

        futures = pool.submit_all(batch)
        for future in as_completed(futures):
            task = futures[future]
            try:
                outcome = future.result()
            except BrokenProcessPool:
                broken.append(task)
                continue
            except Exception as exc:  # noqa: BLE001 - e.g. an outcome that cannot be unpickled
                outcome = task.failed(error_line(exc))
            pool.finished.add(task.key)
            yield task, outcome


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

    Used as a context manager, the client (and LocalCluster) stays up between :meth:`run` calls.
    Interrupted, it cancels the batch's futures (a task already running on a remote worker may still
    finish: its outputs are complete, with their marker, or absent) and closes the client and the
    LocalCluster (best effort, at most :data:`CLOSE_TIMEOUT_S` each).
    """

    def __init__(self, scheduler: str | None = None, workers: int = 1, threads_per_worker: int = 1,
                 gpu: bool = False) -> None:
        self.scheduler = scheduler
        self.workers = workers
        self.threads_per_worker = threads_per_worker
        self.gpu = gpu
        self._stack: contextlib.ExitStack | None = None
        self._client: Any = None

    def __enter__(self) -> DaskExecutor:  # noqa: PYI034
        self._stack = contextlib.ExitStack()
        return self

    def __exit__(self, *exc: object) -> None:
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            stack.close()

    @contextlib.contextmanager
    def client(self) -> Iterator[Any]:
        """A connected ``distributed.Client`` (and its LocalCluster when no scheduler was given)."""
        from distributed import Client, LocalCluster

        apply_dask_log_level()  # importing distributed may have reset its level from Dask's config
        if self.scheduler is None:
            resources = {"GPU": 1} if self.gpu else None
            cluster = LocalCluster(n_workers=self.workers, threads_per_worker=1, processes=True,
                                   dashboard_address=None, env=thread_env(self.threads_per_worker),
                                   resources=resources,
                                   silence_logs=logging.WARNING if _dask_log_level is None else _dask_log_level)
            try:
                with _closing_client(Client(cluster)) as client:
                    yield client
            finally:
                try:
                    cluster.close(timeout=CLOSE_TIMEOUT_S)
                except Exception as exc:  # noqa: BLE001 - best effort; the caller stops leftover processes
                    log.warning("closing the local Dask cluster failed: %s", error_line(exc))
        elif self.scheduler.endswith(".json"):
            with _closing_client(Client(scheduler_file=self.scheduler)) as client:
                yield client
        else:
            with _closing_client(Client(self.scheduler)) as client:
                yield client

    def run(self, tasks: Sequence[Job]) -> Iterator[tuple[Job, ScanOutcome]]:
        from distributed import as_completed

        from bml_pipeline.batch.dask_plugin import ModelPreloader, run_task_on_worker

        if not tasks:
            return
        with contextlib.ExitStack() as own:
            if self._client is None:
                self._client = (self._stack or own).enter_context(self.client())
            client = self._client
            if self._stack is None:
                own.callback(setattr, self, "_client", None)
            for model, device in sorted({(t.model, _device_of(t)) for t in tasks if t.model is not None}):
                client.register_plugin(ModelPreloader(model, parse_devices(device)), name=f"bml-model-{model}")
            batch_id = uuid.uuid4().hex[:8]
            futures = {}
            for task in tasks:
                resources = {"GPU": 1} if self.gpu and task.model is not None else None
                key = f"bml-{'-'.join(task.key)}-{batch_id}"
                futures[client.submit(run_task_on_worker, task, key=key, resources=resources, pure=False)] = task
            try:
                for future in as_completed(futures):
                    task = futures[future]
                    try:
                        outcome = future.result()
                    except Exception as exc:  # noqa: BLE001 - KilledWorker, lost connection ...
                        outcome = task.failed(error_line(exc))
                    future.release()
                    yield task, outcome
            except BaseException:  # interrupted: cancel what is queued or running, then close (stack)
                with contextlib.suppress(Exception):
                    client.cancel(list(futures), force=True)
                raise


@contextlib.contextmanager
def _closing_client(client: Any) -> Iterator[Any]:
    """``client``, closed on exit within :data:`CLOSE_TIMEOUT_S` (best effort)."""
    try:
        yield client
    finally:
        try:
            client.close(timeout=CLOSE_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - best effort
            log.warning("closing the Dask client failed: %s", error_line(exc))
