"""Stopping a batch on SIGINT (Ctrl-C) or SIGTERM (``kill``, a job scheduler's time limit).

:func:`stop_on_signals` turns the first of these signals into a :class:`BatchInterrupted` exception in
the main thread. The batch unwinds from wherever it waits: its executor cancels queued jobs and
terminates its worker processes (:mod:`bml_pipeline.batch.executors`), unfinished jobs' temporary files
are removed (:func:`bml_pipeline.batch.runner.run_batch`), and :func:`stop_children` ends any process
this one started that is still alive. Every output is written atomically and each job's completion marker
last, so what an interrupted batch leaves is either finished (and checksummed) or recomputed by
``--resume``. The conventional exit status is ``128 + signal number``: 130 for SIGINT, 143 for SIGTERM.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class BatchInterrupted(KeyboardInterrupt):
    """The batch was asked to stop by a signal (a KeyboardInterrupt, so code that lets Ctrl-C through
    lets this through too)."""

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        super().__init__(f"interrupted by {self.signal_name}")

    @property
    def signal_name(self) -> str:
        try:
            return signal.Signals(self.signum).name
        except ValueError:
            return f"signal {self.signum}"

    @property
    def exit_code(self) -> int:
        """``128 + signal number`` (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + self.signum


@contextlib.contextmanager
def stop_on_signals(signals: Sequence[int] = STOP_SIGNALS) -> Iterator[None]:
    """Raise :class:`BatchInterrupted` in the main thread on the first of ``signals``; later ones are
    ignored while the batch stops (so the clean-up itself is not interrupted). Previous handlers are
    restored on exit. Outside the main thread (where Python cannot handle signals) this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def handler(signum: int, frame: object) -> None:
        if received:
            log.warning("already stopping (%s); please wait", signal.Signals(signum).name)
            return
        received.append(signum)
        raise BatchInterrupted(signum)

    previous = {}
    try:
        for signum in signals:
            previous[signum] = signal.signal(signum, handler)
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old if old is not None else signal.SIG_DFL)


def stop_processes(processes: Sequence[Any], grace_s: float = 3.0) -> None:
    """SIGTERM ``processes`` (:class:`multiprocessing.Process` objects), SIGKILL those that have not
    exited after ``grace_s``, and wait up to ``grace_s`` more for them.

    Exit is detected through each process's sentinel (ready once the process is gone), not by reaping
    it: another thread (a process pool's manager) may be joining the same processes."""
    from multiprocessing.connection import wait

    pending = {}
    for process in processes:
        with contextlib.suppress(Exception):
            if process.exitcode is None:
                pending[process.sentinel] = process
                process.terminate()
    for kill in (False, True):
        deadline = time.monotonic() + grace_s
        while pending and time.monotonic() < deadline:
            try:
                for sentinel in wait(list(pending), timeout=max(0.0, deadline - time.monotonic())):
                    pending.pop(sentinel, None)
            except (OSError, ValueError):  # a sentinel closed meanwhile: that process was joined
                pending = {s: p for s, p in pending.items() if not _closed(p)}
        if not kill:
            for process in pending.values():
                log.warning("worker process %s did not stop on SIGTERM; killing it", process.pid)
                with contextlib.suppress(Exception):
                    process.kill()
    for process in pending.values():
        log.warning("worker process %s is still running after SIGKILL", process.pid)


def _closed(process: Any) -> bool:
    try:
        return process.exitcode is not None
    except ValueError:  # process object closed
        return True


def stop_children(grace_s: float = 3.0) -> list[int]:
    """Terminate the processes this process started through :mod:`multiprocessing` (pool workers, Dask
    LocalCluster workers) that are still alive: SIGTERM, then SIGKILL after ``grace_s``. Returns their
    process ids."""
    children = multiprocessing.active_children()
    stop_processes(children, grace_s)
    for child in children:
        with contextlib.suppress(Exception):
            child.join(grace_s)
    return [c.pid for c in children if c.pid is not None]
