"""The cluster's tile processes, counted where jobs are planned.

Every node that takes the tiles queue announces its pool size in the tile store as it starts and every few seconds
after (`store.announce_processes`: a sorted set scored by when each announcement lapses), and withdraws it as it
stops. A tiling task reads the sum (`store.tile_processes`, one round trip) and cuts a big job into a few batches
per process of the whole cluster rather than many small ones (`pipeline.tiling.auto_batch_size`): every batch is a
Celery task, whose result, chord count and acknowledgement cost the same whatever its size (docs/scaling.md).
A node that dies stops announcing and drops out of the count within ANNOUNCE_TTL_S.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from tasks import store
from tasks.steps import RepeatingStep

ANNOUNCE_EVERY_S = 5.0
ANNOUNCE_TTL_S = 3 * ANNOUNCE_EVERY_S  # two missed announcements do not drop a live node

log = logging.getLogger(__name__)


def roster_step(connect: Callable[[], Any]) -> type[RepeatingStep]:
    """The consumer step that announces this node's tile processes, through the store client `connect()` gives: one
    tried once per command, as the announcements run on the worker's event loop, which a retrying client would stop,
    messages and heartbeats with it, for as long as the store is away (a failover, a restart).

    Args:
        connect: gives the store's client when an announcement is made.

    Returns:
        The step, for `app.steps["consumer"].add`.
    """

    class Roster(RepeatingStep):
        failure = "could not announce {host}'s processes"

        def __init__(self, consumer: Any, **kwargs: Any) -> None:
            super().__init__(consumer, **kwargs)
            self.member: str | None = None

        def start(self, consumer: Any) -> None:
            if consumer.app.conf.tiles_queue not in consumer.app.amqp.queues.consume_from:
                return  # takes no tiles: not a process a job's batches can go to
            self.run_once(consumer)
            self.repeat(consumer, ANNOUNCE_EVERY_S)

        def stop(self, consumer: Any) -> None:
            super().stop(consumer)
            if self.member is not None:
                try:
                    store.withdraw_processes(connect(), self.member)
                except Exception as error:  # it lapses on its own
                    log.warning("could not withdraw %s from the roster: %s", consumer.hostname, error)
                self.member = None

        def run(self, consumer: Any) -> None:
            """Announce this node's tile processes (withdrawing the old count of a resized pool)."""
            member = store.roster_member(consumer.hostname, int(consumer.pool.num_processes))
            client = connect()
            if self.member not in (None, member):  # the pool was resized
                store.withdraw_processes(client, self.member)
            store.announce_processes(client, member, ANNOUNCE_TTL_S)
            self.member = member

    return Roster
