"""Native thread pools the measure stage turns off while it runs (it spreads its own work over Python
threads, :func:`~bml_pipeline.measure.thickness.available_threads` of them).

- ``blas_single_threaded()``: numpy's OpenBLAS to one thread. The stage's matrix products are (N, 3)
  by (3, 3); OpenBLAS splits them over its threads, which then spin waiting for the next call and
  take a core from the stage's own threads: on 2 cores a knee took 1.5 s more CPU and 1.3 s more wall
  time with them. Each product's rows are computed the same way on any number of threads, so the
  results do not change.
- ``itk_single_threaded()``: ITK's global default thread count to one (see :mod:`.thickness`).

Both are re-entrant across threads (a counter; the first user sets, the last restores) and change
process-wide settings only while a user is inside.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import threading
from collections.abc import Callable, Iterator
from functools import lru_cache

log = logging.getLogger(__name__)


class _Limiter:
    """Set a process-wide thread count to 1 while any thread is inside, restore it after the last."""

    def __init__(self, get: Callable[[], list[int]], set_: Callable[[list[int]], None]) -> None:
        self._get, self._set = get, set_
        self._lock = threading.Lock()
        self._users = 0
        self._saved: list[int] = []

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            if self._users == 0:
                self._saved = self._get()
                self._set([1] * len(self._saved))
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    self._set(self._saved)


@lru_cache(maxsize=1)
def _openblas() -> list[tuple[Callable[[], int], Callable[[int], None]]]:
    """(get, set) thread-count functions of every OpenBLAS loaded in this process (numpy's and scipy's
    bundled ``scipy_openblas`` builds, or a system one); empty where none is found (then nothing is
    changed)."""
    import numpy  # noqa: F401  (loads numpy's BLAS)

    found = []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            paths = sorted({line.split()[-1] for line in maps if "openblas" in line.lower() and "/" in line})
    except OSError:
        return []
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix, suffix in (("scipy_openblas", "64_"), ("scipy_openblas", ""), ("openblas", "64_"),
                               ("openblas", "")):
            get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
            set_ = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
            if get is not None and set_ is not None:
                get.restype, get.argtypes = ctypes.c_int, []
                set_.restype, set_.argtypes = None, [ctypes.c_int]
                found.append((get, set_))
                break
    return found


def _blas_get() -> list[int]:
    return [int(get()) for get, _ in _openblas()]


def _blas_set(counts: list[int]) -> None:
    for (_, set_), n in zip(_openblas(), counts):
        set_(max(1, int(n)))


def _itk_get() -> list[int]:
    import SimpleITK as sitk

    return [int(sitk.ProcessObject.GetGlobalDefaultNumberOfThreads())]


def _itk_set(counts: list[int]) -> None:
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(max(1, int(counts[0])))


blas_single_threaded = _Limiter(_blas_get, _blas_set)
itk_single_threaded = _Limiter(_itk_get, _itk_set)
