"""What the command line tells its user: one-line errors with exit codes, and plain messages on stderr."""

from __future__ import annotations

import sys

from rich.console import Console

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


def say(console: Console, message: str) -> None:
    """A plain line on stderr: no markup, so brackets in paths print as they are."""
    console.print(message, markup=False, highlight=False, soft_wrap=True)


def describe(error: BaseException) -> str:
    """An image's error as one line: a CliError as written for the user, a job's error as `Type: message`."""
    return str(error) if isinstance(error, CliError) else f"{type(error).__name__}: {error}"


def print_error(message: str) -> None:
    print(f"tilerec: error: {' '.join(message.split())}", file=sys.stderr, flush=True)
