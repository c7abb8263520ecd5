"""Consumer steps that do something every few seconds on the worker's event loop (leases, the roster, the stall
watch): one timer's start and stop, and one rule for a run that fails, which is logged while the next run tries
again, since the event loop that runs it also takes messages and sends heartbeats."""

from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps

log = logging.getLogger(__name__)


class RepeatingStep(bootsteps.StartStopStep):
    """A consumer step whose `run(consumer)` is called every `every` seconds from `repeat` on, until the worker
    stops; `failure` (formatted with the node's `host` name) says in the log what a failed run could not do."""

    requires = ("celery.worker.consumer.tasks:Tasks",)
    failure = "a periodic step of {host} failed"

    def __init__(self, consumer: Any, **_: Any) -> None:
        self.timer: Any = None

    def run(self, consumer: Any) -> None:
        raise NotImplementedError

    def repeat(self, consumer: Any, every: float) -> None:
        """Run every `every` seconds from now on."""
        self.timer = consumer.timer.call_repeatedly(every, self.run_once, (consumer,))

    def run_once(self, consumer: Any) -> None:
        """`run`, a failure logged: the next run tries again, and the event loop must go on."""
        try:
            self.run(consumer)
        except Exception as error:
            log.warning("%s: %s", self.failure.format(host=consumer.hostname), error)

    def stop(self, consumer: Any) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def shutdown(self, consumer: Any) -> None:
        self.stop(consumer)
