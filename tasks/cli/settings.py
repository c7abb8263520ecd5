"""The `tilerec` command's settings: what it reads from its environment, read here when a command runs (with
celeryconfig's own fallbacks, docs/configuration.md), and how and where its jobs run (its flags over that)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from pipeline.readers import images
from pipeline.recognizers.plugins import allow_modules, module_list
from tasks.cli.errors import say


@dataclass(frozen=True)
class Environment:
    """What the command takes from its environment."""

    broker: str | None  # TILEREC_BROKER_URL; None: a private cluster is started
    allowed_roots: tuple[Path, ...]  # TILEREC_ALLOWED_ROOTS: `view` finds a result's image there too
    plugin_modules: tuple[str, ...]  # TILEREC_PLUGIN_MODULES: options are checked here as the workers check them


def environment() -> Environment:
    """The command's environment, read now."""
    return Environment(
        broker=os.environ.get("TILEREC_BROKER_URL") or None,
        allowed_roots=tuple(images.roots_from(os.environ.get("TILEREC_ALLOWED_ROOTS", ""))),
        plugin_modules=module_list(os.environ.get("TILEREC_PLUGIN_MODULES", "")),
    )


def set_up() -> None:
    """The pipeline's process-wide settings that checking a job's options here needs, as a worker sets its own."""
    allow_modules(environment().plugin_modules)


def environment_with(overrides: Mapping[str, str]) -> dict[str, str]:
    """The environment a process started from here gets: this one's, with `overrides`."""
    return {**os.environ, **overrides}


@dataclass(frozen=True)
class RunSettings:
    """How and where jobs run, shared by `run`, `demo`, `gallery` and `cancel`."""

    broker: str | None
    workers: int | None = None
    shared_path: bool = False
    timeout: float | None = None
    quiet: bool = False
    in_flight: int | None = None  # jobs submitted at a time (None: a few per worker process)
    keep_data: bool = False  # the private cluster's Redis keeps its data in TILEREC_LOCAL_DATA (galleries of people)


def run_settings(args: argparse.Namespace, console: Console | None = None) -> RunSettings:
    """The settings a command's flags give (`add_cluster_flags`; a flag the command lacks: its default), over the
    environment's broker; a warning on `console` for a flag that does not apply.

    Args:
        args: the parsed command line.
        console: where a warning goes; None: none is given.

    Returns:
        The settings; `keep_data` when the run names faces (`--identify`)."""
    broker = getattr(args, "broker", None) or environment().broker
    workers, quiet = getattr(args, "workers", None), getattr(args, "quiet", False)
    if broker and workers and console is not None and not quiet:
        say(console, "tilerec: warning: --workers is for the local cluster; ignored with a broker")
    return RunSettings(broker, workers, getattr(args, "shared_path", False), getattr(args, "timeout", None), quiet,
                       getattr(args, "max_in_flight", None), bool(getattr(args, "identify", None)))  # fmt: skip
