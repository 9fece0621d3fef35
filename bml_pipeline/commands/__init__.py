"""Subcommands of the ``bml-pipeline`` CLI, one module each.

Every module here defines ``COMMAND``, a :class:`Command`; :mod:`bml_pipeline.cli` discovers them.
Modules import heavy libraries (torch, monai, matplotlib) inside ``run`` only, so ``--help`` is fast.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    """A subcommand: its name, one-line help, an argument hook and the function that runs it.

    ``run`` returns the process exit code (0 success). It raises
    :class:`~bml_pipeline.errors.InputError` for bad input; the CLI turns that into exit code 2.
    """

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
