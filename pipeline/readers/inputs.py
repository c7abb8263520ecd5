"""What an input is, read once before any reader opens it: where it lives (a file, bytes uploaded to the store, an
object in storage), its format from its first bytes, and its length and ends, which tell a truncation.

`identify` is the one place that touches an input's bytes before a reader does, and there the operating system's
errors become `ImageError`s a user can act on (`file_errors`): the readers then open an `Input` whose name,
format and size are known, each through its own library.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pipeline.readers import formats, remote
from pipeline.readers.images import ImageError, confine
from pipeline.readers.remote import RemoteObject

TAIL_BYTES = 32  # what `formats.truncation` looks at: a PNG's IEND chunk, a JPEG's end-of-image marker


@dataclass(frozen=True)
class Input:
    """An image as its first and last bytes describe it, before a reader opens it.

    `target` is where it lives: a file's confined path, its bytes, or an object in storage (`remote`); `name` how
    messages name it; `size` its length in bytes; `kind` its format from its signature (`formats.kind_of`), None
    where no format tilerec decodes starts this way (a slide's own format, say); `head` its first HEAD_BYTES;
    `dimensions` its (width, height) where its header is read here (`formats.dimensions`: the formats OpenCV
    decodes), None where its reader reads its own; `truncation` why its ends say it is cut short, or None; `vendor`
    the slide format OpenSlide sees in a local file (`slide_vendor`), or None."""

    target: Path | bytes | RemoteObject
    name: str
    size: int
    kind: str | None
    head: bytes
    dimensions: tuple[int, int] | None
    truncation: str | None
    vendor: str | None

    @property
    def remote(self) -> bool:
        return isinstance(self.target, RemoteObject)


def identify(target: Path | bytes | RemoteObject) -> Input:
    """What `target` is, from its first bytes, its last ones and its length (one read of each, nothing decoded).

    Args:
        target: a confined path, the image's bytes, or an object in storage (`remote.stat`).

    Returns:
        Its description.

    Raises:
        ImageError: it is missing, unreadable, a folder or empty, or its header (of a format whose size is read
            here) is damaged.
    """
    vendor = slide_vendor(target) if isinstance(target, Path) else None
    name, head, tail, size = _ends(target)
    kind = formats.kind_of(head)
    return Input(target, name, size, kind, head, formats.dimensions(kind, head),
                 formats.truncation(kind, head, tail, size), vendor)  # fmt: skip


def _ends(target: Path | bytes | RemoteObject) -> tuple[str, bytes, bytes, int]:
    """The target's name, its first HEAD_BYTES and last TAIL_BYTES (none of an object in storage, which is a TIFF
    or refused), and its length."""
    if isinstance(target, Path):
        name = repr(str(target))
        with file_errors(str(target)), open(target, "rb") as handle:
            head = handle.read(formats.HEAD_BYTES)
            size = handle.seek(0, 2)
            handle.seek(max(0, size - TAIL_BYTES))
            if not head:
                raise ImageError(f"the image is empty (0 bytes): {name}")
            return name, head, handle.read(), size
    if isinstance(target, bytes):
        if not target:
            raise ImageError("the image is empty (0 bytes)")
        return "the image", target[: formats.HEAD_BYTES], target[-TAIL_BYTES:], len(target)
    head = remote.read_range(target.url, 0, min(formats.HEAD_BYTES, target.size)) if target.size else b""
    return repr(target.url), head, b"", target.size


def data(found: Input) -> bytes:
    """The whole of a file or of bytes (a format decoded whole).

    Raises:
        ImageError: the file can no longer be read.
    """
    if isinstance(found.target, bytes):
        return found.target
    assert isinstance(found.target, Path)  # objects in storage are TIFFs, read by window
    with file_errors(str(found.target)):
        return found.target.read_bytes()


def read_file(path: str, roots: Sequence[Path]) -> bytes:
    """The bytes of a file, once confined to `roots` (`images.confine`).

    Raises:
        ImageError: the path is outside every root, missing, a folder or unreadable.
    """
    real = confine(path, roots)
    with file_errors(path):
        return real.read_bytes()


def slide_vendor(path: Path) -> str | None:
    """The slide format OpenSlide recognizes in the file ("aperio", "generic-tiff", …); None where it sees none or
    OpenSlide is not installed."""
    try:
        import openslide
    except ImportError:
        return None
    try:
        return openslide.OpenSlide.detect_format(str(path))
    except Exception:  # OpenSlide reports an unreadable file as no format at all
        return None


@contextmanager
def file_errors(path: str) -> Iterator[None]:
    """OS errors while reading an image (or video) file, as ImageErrors in words a user understands."""
    try:
        yield
    except FileNotFoundError:
        raise ImageError(f"image file {path!r} does not exist") from None
    except IsADirectoryError:
        raise ImageError(f"{path!r} is a directory, not an image file") from None
    except OSError as error:
        raise ImageError(f"cannot read image file {path!r}: {error.strerror}") from None
