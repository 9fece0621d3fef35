"""Exceptions with messages a user can act on.

`InputError` is raised for bad input (missing, corrupt, wrong shape, inconsistent geometry, unknown
labels ...). Its message is one line that names the offending file and the problem; the CLI prints it
and exits with status 2.
"""

from __future__ import annotations

from pathlib import Path


class BmlError(Exception):
    """Base class of the package's own errors."""


class InputError(BmlError):
    """Bad input. ``str(err)`` is ``"<path>: <problem>"`` on one line."""

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = None if path is None else str(path)
        self.problem = " ".join(str(problem).split())
        super().__init__(self.problem if self.path is None else f"{self.path}: {self.problem}")


class GeometryMismatchError(InputError):
    """Two volumes that must share a voxel grid do not."""
