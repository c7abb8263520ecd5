"""The command line's arguments and input images, checked before any cluster starts."""

from __future__ import annotations

import argparse
import importlib.util
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2

from pipeline.options import DEFAULTS, JOB_OPTIONS, READERS, parse_options
from pipeline.readers import images, remote, sources
from pipeline.readers.inputs import file_errors, slide_vendor
from tasks.cli.errors import CliError


def parse_param(pair: str) -> tuple[str, Any]:
    """`key=value`, the value read as JSON when it is JSON (numbers, true, lists), else kept as a string."""
    key, sep, value = pair.partition("=")
    if not sep or not key.strip():
        raise CliError(f"--param wants key=value, got {pair!r}")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def parse_size(text: str) -> tuple[int, int]:
    """`4000x3000` to (width, height); argparse turns the ValueError into a usage error."""
    width, sep, height = text.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit() or int(width) <= 0 or int(height) <= 0:
        raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHT in pixels, e.g. 4000x3000, got {text!r}")
    return int(width), int(height)


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number above 0, got {text!r}")
    return int(text)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, got {text!r}")
    return value


def number_list(kind: type) -> Any:
    """An argparse type: comma-separated numbers of `kind` ("3,2,1")."""

    def parse(text: str) -> list[Any]:
        try:
            return [kind(part) for part in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be comma-separated numbers, got {text!r}") from None

    return parse


def add_read_flags(parser: argparse.ArgumentParser) -> None:
    """How an image is opened (docs/geospatial.md): `run`'s, and `view`'s to show the image as the job read it."""
    parser.add_argument(
        "--reader", choices=READERS, help=f"how images are opened (default {DEFAULTS.reader}: by their content)"
    )
    parser.add_argument(
        "--bands", type=number_list(int), metavar="B[,G,R]", help="GeoTIFF bands as grey or red,green,blue, e.g. 3,2,1"
    )
    parser.add_argument(
        "--stretch", type=number_list(float), metavar="LOW,HIGH", help="band values shown as 0..255 (16-bit imagery)"
    )


def job_options(args: argparse.Namespace) -> dict[str, Any]:
    """The job's keyword options from the flags the user set (unset flags keep the pipeline's defaults), checked
    here with the workers' own parser so a bad option fails before any cluster starts."""
    options: dict[str, Any] = {
        name: getattr(args, name) for name in JOB_OPTIONS if getattr(args, name, None) is not None
    }
    params = dict(parse_param(pair) for pair in args.param or [])
    params.update(identity_params(args))
    if params:
        options["params"] = params
    try:
        parse_options(args.recognizer, options)
    except ValueError as error:  # OptionsError, RecognizerError
        raise CliError(str(error)) from None
    return options


def identity_params(args: argparse.Namespace) -> dict[str, Any]:
    """`--identify G` and its flags as the face detector's parameters; a recognizer without an identities stage is
    refused by name, before any cluster starts."""
    identify = getattr(args, "identify", None)
    if not identify:
        if getattr(args, "identity_threshold", None) is not None or getattr(args, "identity_repeats", False):
            raise CliError("--identity-threshold and --identity-repeats go with --identify G")
        return {}
    from pipeline.recognizers import RecognizerError, get_spec

    try:
        spec = get_spec(args.recognizer)
    except RecognizerError as error:
        raise CliError(str(error)) from None
    if "identify" not in spec.params:
        raise CliError(
            f"--identify needs a face detector with five landmarks and an identities stage, such as faces-dnn; "
            f"recognizer {args.recognizer!r} has none"
        )
    params: dict[str, Any] = {"identify": identify}
    if args.identity_threshold is not None:
        params["identity_threshold"] = args.identity_threshold
    if args.identity_repeats:
        params["identity_repeats"] = True
    return params


@dataclass(frozen=True)
class Target:
    """One input image: the name the user gave (for messages and outputs) and its real absolute path (None: a URL,
    which the workers check against their TILEREC_ALLOWED_URLS and read themselves)."""

    given: str
    path: Path | None

    def __fspath__(self) -> str:  # what tasks.client.submit_many sends the workers, or reads to upload
        return self.given if self.path is None else str(self.path)


# what tilerec's readers decode, by extension: OpenCV's list (its documentation's; GIF since 4.11), which libvips'
# formats (JPEG, PNG, GIF, AVIF, TIFF) are among
OPENCV_SUFFIXES = frozenset(
    {".bmp", ".dib", ".jpeg", ".jpg", ".jpe", ".jp2", ".png", ".webp", ".avif", ".gif", ".pbm", ".pgm", ".ppm",
     ".pxm", ".pnm", ".pfm", ".sr", ".ras", ".tiff", ".tif", ".exr", ".hdr", ".pic"}
)  # fmt: skip
# whole-slide formats OpenSlide opens (the `slide` extra)
SLIDE_SUFFIXES = frozenset({".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".dcm"})


def reader_suffixes() -> frozenset[str]:
    """The file extensions some available reader takes: OpenCV's formats (TIFFs included), NumPy arrays, and the
    whole-slide formats where OpenSlide is installed. A folder given to `run` contributes those files only."""
    slides = SLIDE_SUFFIXES if importlib.util.find_spec("openslide") else frozenset()
    return OPENCV_SUFFIXES | {".npy"} | slides


def check_image(given: str, max_pixels: int = images.DEFAULT_MAX_PIXELS) -> Target:
    """Fail early, in this process, for a missing, unreadable or non-image file, rather than as a job error later.
    Reads only the file's header: the workers read a gigapixel TIFF window by window, never whole."""
    if remote.is_url(given):
        return Target(given, None)
    try:
        with file_errors(given):  # the readers' words for a missing or unreadable file
            real = Path(given).expanduser().resolve(strict=True)
            real.open("rb").close()
    except images.ImageError as error:
        raise CliError(str(error)) from None
    try:
        if not slide_vendor(real):
            images.check_pixels(*sources.image_size(real), max_pixels)
    except images.ImageError as error:
        raise CliError(f"cannot use image {given!r}: {error}") from None
    return Target(given, real)


def output_path(template: str, target: Target, index: int, count: int) -> Path:
    """Where one image's output goes: the path itself for one image; for several, `{stem}`, `{name}` and `{index}`
    in the path are filled in, or else `-STEM` is put before the suffix."""
    if count == 1:
        return Path(template)
    if "{" in template:
        try:
            return Path(template.format(stem=target.path.stem, name=target.path.name, index=index + 1))
        except (KeyError, IndexError, ValueError) as error:
            raise CliError(f"bad output template {template!r}: use {{stem}}, {{name}} or {{index}} ({error})") from None
    path = Path(template)
    return path.with_name(f"{path.stem}-{target.path.stem}{path.suffix}")


def annotate_paths(template: str | None, targets: Sequence[Target]) -> list[Path]:
    """Checked before any work: a format OpenCV can write, and one distinct file per image."""
    if template is None:
        return []
    if urls := [target.given for target in targets if target.path is None]:
        raise CliError(f"--annotate draws on local images only; {urls[0]!r} is a URL")
    paths = [output_path(template, target, i, len(targets)) for i, target in enumerate(targets)]
    if len(set(paths)) != len(paths):
        raise CliError(f"--annotate {template!r} gives two images the same file; put {{index}} in it")
    for path in paths:
        if not cv2.haveImageWriter(str(path)):
            raise CliError(f"--annotate {str(path)!r}: OpenCV cannot write that format (use .png or .jpg)")
    return paths
