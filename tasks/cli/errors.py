"""What the command line tells its user: one-line errors with exit codes, and plain messages on stderr."""

from __future__ import annotations

import re
import sys

from rich.console import Console
from rich.markup import escape

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_TIMEOUT, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130


class CliError(Exception):
    """A failure the user can act on: printed as one line, no traceback, with its exit code."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(" ".join(str(message).split()))
        self.code = code


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised like Ctrl-C so the same cleanup runs (nothing is orphaned)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


# what a terminal acts on rather than shows (C0 and C1 controls with ANSI escapes, \r and \b; bidirectional overrides
# that reorder a line), and lone surrogates (undecodable bytes, which a UTF-8 stream refuses)
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def printable(text: str) -> str:
    """Text from outside (file names, decoded payloads, labels, error messages) made safe for a terminal: each
    character it would act on is shown escaped, as Python writes it (\\x1b, \\r, \\u202e), the rest as is. The one
    way any text reaches the terminal: `say`, `print_error` and `markup_safe` use it."""
    return _UNSAFE.sub(lambda found: repr(found.group())[1:-1], text)


def markup_safe(text: str) -> str:
    """Text from outside for rich's markup (tables, progress lines): printable, and its brackets shown as they are."""
    return escape(printable(text))


def say(console: Console, message: str) -> None:
    """A plain line on stderr: no markup, so brackets in paths print as they are; printable."""
    console.print(printable(message), markup=False, highlight=False, soft_wrap=True)


def describe(error: BaseException) -> str:
    """An image's error as one line: a CliError as written for the user, a job's error as `Type: message`."""
    return str(error) if isinstance(error, CliError) else f"{type(error).__name__}: {error}"


def print_error(message: str) -> None:
    print(f"tilerec: error: {printable(' '.join(message.split()))}", file=sys.stderr, flush=True)
