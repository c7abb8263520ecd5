"""What a second stage's `finish` needs beyond its detections and crop records, loaded by name on the worker.

A `SecondStage` names its resources (`SecondStage.resources`, e.g. "gallery"); pipeline/ has no Redis, so the
tasks layer loads each one with the loader registered under its name, right before the final callback's `finish`:

    from tasks.resources import register

    def load_gallery(client: redis.Redis, options: JobOptions) -> Gallery:   # the store's Redis, the job's options
        ...

    register("gallery", load_gallery)

Register at import time of a module every worker imports (a module of `tasks`, or a plugin's). In one process the
caller passes the same values itself: `pipeline.recognize_image(..., resources={"gallery": gallery})`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import redis

from pipeline.options import JobOptions
from pipeline.recognizers.stages import StageError

Loader = Callable[[redis.Redis, JobOptions], Any]
_LOADERS: dict[str, Loader] = {}


def register(name: str, loader: Loader) -> None:
    """Load the resource `name` with `loader(store client, job options)` wherever a second stage needs it."""
    _LOADERS[name] = loader


def load(client: redis.Redis, names: Iterable[str], options: JobOptions) -> dict[str, Any]:
    """The resources `names`, each loaded by its registered loader.

    Raises:
        StageError: no loader is registered under one of the names.
    """
    loaded = {}
    for name in names:
        if name not in _LOADERS:
            known = ", ".join(sorted(_LOADERS)) or "none"
            raise StageError(f"the second stage needs the resource {name!r}, for which no loader is registered "
                             f"(tasks.resources.register; registered: {known})")  # fmt: skip
        loaded[name] = _LOADERS[name](client, options)
    return loaded
