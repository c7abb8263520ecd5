"""`tilerec`, the command line (usage in tasks.cli.commands): inputs, clusters, jobs and output, a module each."""

from tasks.cli.commands import main

__all__ = ["main"]
