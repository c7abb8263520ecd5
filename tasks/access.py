"""What a job may read: a message names a file, a URL or stored bytes, and a worker opens it only once it is checked
against the settings (files confined to the allowed roots, URLs to the allowed prefixes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.readers import images, remote
from tasks import store
from tasks.celery import settings, store_client


def resolve(image: Any) -> Path | bytes | remote.RemoteObject:
    """What the message names, checked once: a path confined to the allowed roots (a file, or a video's folder of
    frames), an object under an allowed URL prefix (looked at: its size and ETag), or bytes from the store.

    Args:
        image: the job's image (or video) as the message gives it.

    Returns:
        The confined real path, the remote object, or the stored bytes. Raises ImageError (or the readers' own
        errors) naming what is refused and why."""
    if not isinstance(image, str) or not image:
        raise images.ImageError(f"image must be a file path, URL or redis: reference (a string), got {image!r}")
    if image.startswith(store.REF_SCHEME):
        return store.get_bytes(store_client(), image)
    if remote.is_url(image):
        return remote.stat(remote.check_allowed(image, settings().allowed_urls))
    return images.confine(image, settings().allowed_roots)


def allowed(path: str) -> object:
    """The confinement check of a file, or the allow-list check of a URL, before a tile task opens it."""
    if remote.is_url(path):
        return remote.check_allowed(path, settings().allowed_urls)
    return images.confine(path, settings().allowed_roots)
