"""Leases on a worker's unacknowledged messages, so that a short visibility timeout is safe on the Redis transport.

Kombu's Redis transport keeps every delivered, unacknowledged message (running with late acks, prefetched, or held
for a countdown) in the `unacked` hash, scored by its delivery time in `unacked_index`; every consumer's sweep puts
back the ones older than the visibility timeout. That is how a dead node's work comes back; but it puts back a
live node's long task just the same, so the timeout had to be an hour, and a dead node's work waited that long.

This consumer step renews the node's own leases: every third of the visibility timeout it sets the score of each
delivery tag it still holds to now (ZADD XX, so a tag that was acknowledged or put back is never added again). A
live node's messages are never put back; a node that dies (or freezes) stops renewing, and its messages come back
one visibility timeout later (TILEREC_VISIBILITY_TIMEOUT, 15 s by default). Clocks of the nodes must agree to
within a few seconds (NTP), since each renews with its own.
"""

from __future__ import annotations

import time
from typing import Any

from celery.worker import state

from tasks.steps import RepeatingStep


class Leases(RepeatingStep):
    failure = "could not renew the leases of {host}'s messages"

    def start(self, consumer: Any) -> None:
        channel = consumer.task_consumer.channel
        if getattr(channel, "unacked_index_key", None) is None:  # not a Redis transport: nothing to renew
            return
        self.repeat(consumer, max(1.0, float(channel.visibility_timeout) / 3))

    @staticmethod
    def held(consumer: Any) -> set[str]:
        """The delivery tags this node holds: its channel's (prefetched, counted down, running) and those of
        requests still running from a channel a reconnect closed."""
        qos = consumer.task_consumer.channel.qos
        tags = {tag for tag in list(qos._delivered) if tag not in qos._dirty}
        for request in list(state.requests.values()):
            message = getattr(request, "message", None)
            if message is not None and not request.acknowledged:
                tags.add(message.delivery_tag)
        return tags

    def run(self, consumer: Any) -> None:
        """Renew the leases of the messages this node holds."""
        tags = self.held(consumer)
        if tags:
            channel = consumer.task_consumer.channel
            with channel.conn_or_acquire() as client:
                client.zadd(channel.unacked_index_key, dict.fromkeys(tags, time.time()), xx=True)
