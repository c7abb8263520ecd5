"""Images in object storage (`s3://bucket/key`, `gs://`, `az://`, `https://`) read through fsspec with range requests.

Only URLs under a prefix of the settings' allow-list (TILEREC_ALLOWED_URLS) are read, so a publisher cannot make
the workers fetch whatever it names. Credentials come from where fsspec's filesystems look for them: the
environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, …) or fsspec's config files. A file is
read in blocks of BLOCK_BYTES, so a window costs the blocks its TIFF tiles lie in, never the whole object.
fsspec (and s3fs for s3://) is the optional `remote` extra.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.readers.images import ImageError

BLOCK_BYTES = 256 * 2**10  # one range request: a few compressed TIFF tiles, a small share of a large image
# aligned blocks kept in an LRU: a window fetches the blocks its TIFF tiles lie in, once. fsspec's readahead default
# fetched a block beyond every tile read, twice the bytes (docs/performance.md, "Object storage")
CACHE_TYPE = "blockcache"
# what each filesystem calls its read block size (fsspec leaves the name to each implementation)
BLOCK_OPTION = {"s3": "default_block_size", "gs": "default_block_size", "gcs": "default_block_size",
                "az": "blocksize", "abfs": "blocksize", "http": "block_size", "https": "block_size"}  # fmt: skip
CACHE_OPTION = {"s3": "default_cache_type", "gs": "default_cache_type", "gcs": "default_cache_type"}  # rasterio's opens


def is_url(image: str) -> bool:
    """The image names a URL (scheme://…) rather than a file path."""
    return "://" in image


def allowed_urls_from_env(value: str) -> list[str]:
    """URL prefixes from TILEREC_ALLOWED_URLS: separated by commas or spaces; empty: no URL is read."""
    return [part for part in value.replace(",", " ").split() if part]


def check_allowed(url: str, prefixes: Sequence[str]) -> str:
    """The URL, if it starts with one of the allowed prefixes (a bucket prefix ends at a "/" or the bucket name).

    Raises:
        ImageError: URLs are not allowed at all, or this one is outside every prefix.
    """
    if not prefixes:
        raise ImageError(
            f"{url!r}: images are not fetched from URLs (workers would fetch for anyone who can publish); "
            "allow prefixes with TILEREC_ALLOWED_URLS, or store the bytes with tasks.client.put_image and pass its "
            "redis: reference"
        )
    if ".." in url.split("://", 1)[1].split("/"):
        raise ImageError(f"{url!r}: '..' is not allowed in image URLs")
    for prefix in prefixes:
        if url == prefix or url.startswith(prefix if prefix.endswith("/") else prefix + "/"):
            return url
    raise ImageError(f"{url!r} is outside the allowed URLs ({', '.join(prefixes)}; TILEREC_ALLOWED_URLS)")


@dataclass(frozen=True)
class RemoteObject:
    """An object in storage as it was when looked at: its identity tells a replaced object from the planned one."""

    url: str
    size: int
    etag: str  # the ETag (or modification time, where the store has no ETag)


def filesystem(url: str) -> tuple[Any, str]:
    """The fsspec filesystem of the URL's scheme, reading BLOCK_BYTES a request, and the object's path in it."""
    try:
        import fsspec
    except ImportError:
        raise ImageError(f"{url!r}: reading URLs needs fsspec (pip install 'tilerec[remote]')") from None
    protocol = url.split("://", 1)[0]
    # no listings cache: a worker lives long, and must see objects added or replaced since it last looked
    options: dict[str, Any] = {"use_listings_cache": False}
    if protocol in BLOCK_OPTION:
        options[BLOCK_OPTION[protocol]] = BLOCK_BYTES
    if protocol in CACHE_OPTION:
        options[CACHE_OPTION[protocol]] = CACHE_TYPE
    try:
        return fsspec.core.url_to_fs(url, **options)
    except (ImportError, ValueError) as error:
        raise ImageError(f"{url!r}: no filesystem for {protocol}:// ({error})") from None


@contextlib.contextmanager
def remote_errors(url: str) -> Iterator[None]:
    """Storage errors as ImageErrors naming the object and the cause in a user's words."""
    try:
        yield
    except ImageError:
        raise
    except FileNotFoundError as error:
        reason = _reason(error)
        shown = "no such object" if not reason or reason in url else reason  # s3fs gives just the path for a key
        raise ImageError(f"{url!r} does not exist ({shown})") from None
    except PermissionError as error:
        raise ImageError(f"{url!r} cannot be read: access denied, check the credentials ({_reason(error)})") from None
    except Exception as error:
        raise ImageError(f"{url!r} cannot be read: {type(error).__name__}: {_reason(error)}") from None


def _reason(error: BaseException, fallback: str = "") -> str:
    return (str(error).splitlines() or [fallback])[0][:200] or fallback


def stat(url: str) -> RemoteObject:
    """The object's size and identity (one HEAD request)."""
    fs, path = filesystem(url)
    with remote_errors(url):
        info = fs.info(path)
        if info.get("type") == "directory":
            raise ImageError(f"{url!r} is a folder or a bucket, not an object")
    etag = info.get("ETag") or info.get("etag") or str(info.get("LastModified") or info.get("mtime") or "")
    return RemoteObject(url, int(info["size"]), str(etag).strip('"'))


def read_range(url: str, start: int, stop: int) -> bytes:
    """Bytes [start, stop) of the object (one range request; fewer where the object is shorter)."""
    fs, path = filesystem(url)
    with remote_errors(url):
        return fs.cat_file(path, start=start, end=stop)


def open_file(url: str) -> Any:
    """A seekable file object on the object; each read that misses its cache is a range request."""
    fs, path = filesystem(url)
    with remote_errors(url):
        return fs.open(path, "rb", cache_type=CACHE_TYPE)
