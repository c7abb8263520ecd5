"""`tilerec view`: a result's detections over its image, in a deep-zoom viewer (OpenSeadragon) served on loopback.

The page (viewer/) loads the image as Deep Zoom tiles cut on demand from the image file (pipeline.outputs.pyramid) and
the result document itself. `--export DIR` writes the same files as a static folder any web server can host.
"""

from __future__ import annotations

import json
import mimetypes
import re
import shutil
import socket
import threading
import time
import urllib.parse
import webbrowser
from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from pipeline.model import Recognition
from pipeline.outputs.pyramid import Pyramid
from pipeline.readers import images, sources
from tasks.cli.errors import EXIT_OK, EXIT_UNREACHABLE, CliError, say
from tasks.cli.inputs import add_read_flags
from tasks.cli.settings import environment
from tasks.store import REF_SCHEME

PAGE = Path(__file__).with_name("viewer")  # index.html, viewer.js, viewer.css, the vendored OpenSeadragon
TILE_PATH = re.compile(r"/image_files/(\d{1,2})/(\d{1,6})_(\d{1,6})\.jpeg")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def page_files() -> dict[str, Path]:
    """The page's files by URL path ("/viewer.js", …): the only files the server reads besides the image."""
    return {"/" + path.relative_to(PAGE).as_posix(): path for path in sorted(PAGE.rglob("*")) if path.is_file()}


@dataclass
class Viewed:
    """What the viewer shows: the recognition (served as its JSON document), and the image as a tile pyramid."""

    recognition: Recognition
    pyramid: Pyramid

    def result_json(self) -> bytes:
        return json.dumps(self.recognition.to_json(), separators=(",", ":")).encode()


def load_result(given: str, store_url: str | None) -> Recognition:
    """The whole recognition: from a file (the output of `tilerec run --json`, or a summary whose `result_ref`
    names the document in Redis), or from a `redis:tilerec:result:<job id>` reference itself."""
    if given.startswith(REF_SCHEME):
        return _stored_result(given, store_url)
    try:
        document = json.loads(Path(given).expanduser().read_text())
    except FileNotFoundError:
        raise CliError(f"cannot read result {given!r}: no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise CliError(f"cannot read result {given!r}: {getattr(error, 'strerror', None) or error}") from None
    except json.JSONDecodeError as error:
        raise CliError(f"{given!r} is not JSON ({error}); give the output of `tilerec run --json`") from None
    if isinstance(document, list):
        raise CliError(f"{given!r} holds {len(document)} results; view one (`tilerec run` writes one per image)")
    if isinstance(document, dict) and "result_ref" in document:
        return _stored_result(str(document["result_ref"]), store_url)
    try:
        return Recognition.from_json(document)
    except (ValueError, KeyError, TypeError) as error:
        raise CliError(f"{given!r} is not a tilerec result: {error}") from None


def _stored_result(reference: str, store_url: str | None) -> Recognition:
    """The document a `result_ref` names, fetched as a calling app fetches it (`tasks.client.fetch_result`), from
    `store_url` if given, else the configured tile store."""
    from tasks.celery import configure, settings
    from tasks.client import fetch_result

    if store_url:
        configure(tilerec_store_url=store_url)
    try:
        return fetch_result({"result_ref": reference})
    except (ValueError, LookupError) as error:
        raise CliError(str(error)) from None
    except OSError as error:  # redis.ConnectionError is an OSError too
        raise CliError(f"cannot fetch {reference!r} from {settings().store_url}: {error}", EXIT_UNREACHABLE) from None


def image_path(recognition: Recognition, given: str | None, result: str, roots: Sequence[Path]) -> Path:
    """The image to show: `--image` as given, or the one the result names (its `image.source`), which must be a
    file inside `roots`: a result is data from elsewhere, and must not make the viewer serve any file it names."""
    if given is not None:
        path = Path(given).expanduser()
        if not path.is_file():
            raise CliError(f"--image {given!r}: no such file")
        return path.resolve()
    source = recognition.source
    if not source or source.startswith(REF_SCHEME):
        raise CliError(f"{result!r} does not name its image file (it was sent as bytes); give --image PATH")
    candidates = [Path(source).expanduser()]
    if not candidates[0].is_absolute() and not result.startswith(REF_SCHEME):
        candidates.append(Path(result).expanduser().parent / source)
    found = next((path for path in candidates if path.is_file()), None)
    if found is None:
        raise CliError(f"the result's image {source!r} is missing; give --image PATH")
    try:
        return images.confine(str(found), roots)
    except images.ImageError as error:
        raise CliError(f"{error}; give --image PATH or --allow DIR") from None


def open_pyramid(path: Path, recognition: Recognition, spec: sources.ReadSpec) -> Pyramid:
    """The image at the level the result was computed at, with the coarser levels of a pyramidal TIFF, a COG's
    overviews or a slide's levels, read as `spec` says (the job's bands and stretch); its size must be the result's."""
    level = recognition.level
    try:
        first = sources.open_source(path, level=level, spec=spec)
        pyramid_levels = [first]
        if first.windowed:
            pyramid_levels += [sources.open_source(path, level=n, spec=spec) for n in range(level + 1, first.levels)]
    except images.ImageError as error:
        raise CliError(f"cannot show {str(path)!r}: {error}") from None
    width, height = recognition.width, recognition.height
    if (first.width, first.height) != (width, height):
        for source in pyramid_levels:
            source.close()
        at = f" at level {level}" if level else ""
        raise CliError(
            f"{str(path)!r} is {first.width}x{first.height}{at} but the result is of a {width}x{height} image; "
            "give the image the result was made from (--image PATH)"
        )
    return Pyramid(pyramid_levels)


class _Handler(BaseHTTPRequestHandler):
    server: ViewerServer
    protocol_version = "HTTP/1.1"  # keep-alive: a browser fetches dozens of tiles per view over a few connections

    def do_GET(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        viewed = self.server.viewed
        if path in ("/", "/index.html"):
            self._send(self.server.files["/index.html"].read_bytes(), "text/html; charset=utf-8")
        elif path == "/result.json":
            self._send(self.server.result, "application/json")
        elif path == "/image.dzi":
            self._send(viewed.pyramid.grid.dzi().encode(), "application/xml")
        elif (match := TILE_PATH.fullmatch(path)) is not None:
            try:
                tile = viewed.pyramid.tile(*(int(part) for part in match.groups()))
            except IndexError:
                self.send_error(HTTPStatus.NOT_FOUND, "no such tile")
                return
            self._send(tile, "image/jpeg")
        elif path in self.server.files:
            file = self.server.files[path]
            self._send(file.read_bytes(), mimetypes.guess_type(file.name)[0] or "application/octet-stream")
        else:
            self.send_error(HTTPStatus.NOT_FOUND)

    def _send(self, body: bytes, content_type: str) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-cache")  # another result may be served on this port next time
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.verbose:
            super().log_message(format, *args)


class ViewerServer(ThreadingHTTPServer):
    """The viewer's HTTP server: the page, the result, the image's tiles; nothing else."""

    daemon_threads = True

    def __init__(self, viewed: Viewed, host: str = "127.0.0.1", port: int = 0, verbose: bool = False) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, port), _Handler)
        self.viewed, self.verbose = viewed, verbose
        self.files = page_files()
        self.result = viewed.result_json()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/"


def export(viewed: Viewed, out: Path, console: Console, quiet: bool = False) -> int:
    """Write the page, the result and every tile of the pyramid into `out`: a static site. Returns the tiles."""
    grid = viewed.pyramid.grid
    tiles = [(level, column, row) for level in range(grid.max_level + 1)
             for column in range(grid.tile_counts(level)[0]) for row in range(grid.tile_counts(level)[1])]  # fmt: skip
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, file in page_files().items():
            (out / name[1:]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file, out / name[1:])
        (out / "result.json").write_bytes(viewed.result_json())
        (out / "image.dzi").write_text(grid.dzi())
        columns = (TextColumn("tiles"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns, console=console, disable=quiet or not console.is_terminal) as progress:
            task = progress.add_task("tiles", total=len(tiles))
            for level, column, row in tiles:
                path = out / "image_files" / str(level) / f"{column}_{row}.jpeg"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(viewed.pyramid.tile(level, column, row))
                progress.advance(task)
    except OSError as error:
        raise CliError(f"cannot write {str(out)!r}: {error.strerror or error}") from None
    return len(tiles)


def view(viewed: Viewed, host: str, port: int, browser: bool, console: Console) -> int:
    """Serve until interrupted; the URL goes to stdout, so a script can read it."""
    if host not in LOOPBACK:
        say(console, f"tilerec: warning: serving on {host}: anyone who can reach it sees the image and the result")
    try:
        server = ViewerServer(viewed, host, port)
    except OSError as error:
        raise CliError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    print(f"tilerec view: {server.url} (Ctrl-C to stop)", flush=True)
    if browser:
        threading.Thread(target=webbrowser.open, args=(server.url,), daemon=True).start()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        viewed.pyramid.close()
    return EXIT_OK


def allowed_folders(result: str, allow: Sequence[str] | None) -> list[Path]:
    """Where a result's image may be: the current folder, the result's, TILEREC_ALLOWED_ROOTS and --allow."""
    folders = [Path.cwd(), *environment().allowed_roots, *(Path(a).expanduser().resolve() for a in allow or ())]
    if not result.startswith(REF_SCHEME):
        folders.append(Path(result).expanduser().resolve().parent)
    return folders


def cmd_view(args: Any) -> int:
    console = Console(stderr=True)
    recognition = load_result(args.result, args.broker)
    path = image_path(recognition, args.image, args.result, allowed_folders(args.result, args.allow))
    began = time.perf_counter()
    spec = sources.ReadSpec(args.reader or "auto", tuple(args.bands) if args.bands else None,
                            tuple(args.stretch) if args.stretch else None)  # fmt: skip
    viewed = Viewed(recognition, open_pyramid(path, recognition, spec))
    if args.export is not None:
        count = export(viewed, Path(args.export), console, args.quiet)
        viewed.pyramid.close()
        if not args.quiet:
            say(console, f"tilerec view: wrote {count} tiles, the page and the result to {args.export} "
                f"in {time.perf_counter() - began:.1f} s; serve it with any web server")  # fmt: skip
        return EXIT_OK
    return view(viewed, args.host, args.port, not args.no_browser, console)


def add_view_parser(commands: Any) -> None:
    view_parser = commands.add_parser(
        "view",
        help="show a result's detections over its image in a deep-zoom viewer (a local web page)",
        description="Serve a deep-zoom viewer of a result on loopback (the URL is printed), or write it as a static "
        "folder with --export.",
    )
    view_parser.add_argument(
        "result", metavar="RESULT", help="a result JSON (`tilerec run --json`), or a redis:tilerec:result:… reference"
    )
    view_parser.add_argument("--image", metavar="PATH", help="the image (default: the file the result names)")
    view_parser.add_argument(
        "--allow", action="append", metavar="DIR", help="a folder the result's image may be in (repeatable)"
    )
    add_read_flags(view_parser)  # as the job's, to show the image as it read it
    view_parser.add_argument("--export", metavar="DIR", help="write a static site (page, result, tiles) instead")
    view_parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    view_parser.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    view_parser.add_argument("--no-browser", action="store_true", help="do not open a browser")
    view_parser.add_argument(
        "--broker", metavar="URL", help="the Redis holding a result stored by reference (default: TILEREC_STORE_URL)"
    )
    view_parser.add_argument("--quiet", "-q", action="store_true", help="no progress or messages")
    view_parser.set_defaults(handler=cmd_view)
