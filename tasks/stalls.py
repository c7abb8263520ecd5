"""Jobs that repair themselves when a message of theirs is lost.

Redis replicates asynchronously: a batch message (or a chord's merge) published just before a Sentinel master dies
can be lost in the failover, as can any message an operator flushes or a broker restored from an older snapshot
never had. Its job would wait for ever. Here:

1. A task that becomes a job's chord (tiling, a merge with a second stage, a video's first task) stores the chord
   as its messages are sent (`SentChord`: the header tasks' ids, group and ranges, and the body), just before it
   sends them, and the job is watched until it ends (`store.put_chord`).
2. Every node watches those jobs (`StallWatch`, a consumer step): a job whose progress (its tiles, crops or frames
   done, its chord's count, whether its merge was sent) has not moved for TILEREC_STALL_S is claimed by one node
   for a stall period (a job key), which looks it up in the broker, once per look for all such jobs. A message
   queued (kombu's list per queue and priority) or delivered and not acknowledged (its `unacked` hash) is work
   merely waiting or running: nothing is done, however long it waits. A part of the chord not counted whose message
   is nowhere, seen so at two looks in a row (a message moves between a list and the hash in between), was lost.
3. That node sends the lost messages again, each with its original task id, group, index in the group and chord:
   Celery counts a part once per task id and index, so a batch that ran after all is counted once, and its
   records, keyed by tile, once too. A chord counted in full whose merge is nowhere has its merge sent again, under
   the job's id.

Celery's own state of a chord is read where its Redis backend keeps it (`.d`: the parts counted, as "id:index";
`.c`: "done" once the callback was sent; `.s`: its size); tests/test_stalls.py fails if that changes.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any

import redis
from celery import Task, chord, group, signature
from celery.canvas import Signature

from tasks import store
from tasks.celery import app, settings, store_client
from tasks.steps import RepeatingStep

SCAN_EVERY = 1000  # messages read from the broker in one round trip
UNITS = {"tilerec.recognize_tiles": "tiles", "tilerec.recognize_crops": "crops", "tilerec.recognize_segment": "frames"}
BODY_LEFT_OUT = ("task_id", "parent_id", "countdown", "eta", "link", "link_error")  # Celery's chord keeps these off
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Batch:
    """A header task of a job's chord as sent: its id and the range of units [first, stop) it carries."""

    id: str
    first: int
    stop: int
    priority: int | None


@dataclass(frozen=True)
class SentChord:
    """A job's chord as its messages were sent: enough to send any of them again as it was."""

    task: str  # the header tasks' name
    group: str  # the chord's group id (Celery counts its parts under it)
    body: dict[str, Any]  # the callback's signature, as the header messages carry it
    batches: list[Batch]
    root: str | None
    nesting: int  # how often the job's tasks were replaced (Celery carries it in the header messages)

    @classmethod
    def of(cls, job_id: str, work: chord) -> SentChord:
        """The chord `work` (frozen, its options set, as Task.replace sends it) of job `job_id`; a job in a
        caller's chain has the rest of the chain in its body, and its header as a lazy list."""
        header = list(work.tasks.tasks if isinstance(work.tasks, group) else work.tasks)
        body = work.body.clone(**{k: v for k, v in work.options.items() if k not in BODY_LEFT_OUT})
        batches = [Batch(task.id, task.args[1], task.args[2], task.options.get("priority")) for task in header]
        root, nesting = work.options.get("root_id") or job_id, work.options.get("replaced_task_nesting", 0)
        return cls(header[0].task, work.id, dict(body), batches, root, nesting)

    def to_json(self) -> str:
        return json.dumps({"task": self.task, "group": self.group, "body": self.body, "root": self.root,
                           "nesting": self.nesting,
                           "batches": [[b.id, b.first, b.stop, b.priority] for b in self.batches]})  # fmt: skip

    @classmethod
    def from_json(cls, text: str) -> SentChord:
        data = json.loads(text)
        batches = [Batch(*batch) for batch in data.pop("batches")]
        return cls(**data, batches=batches)

    def batch(self, job_id: str, number: int) -> Signature:
        """The message of the chord's `number`-th header task, as sent: same id, group, index and callback."""
        sent = self.batches[number]
        options = {"task_id": sent.id, "group_id": self.group, "group_index": number, "chord": self.body,
                   "root_id": self.root, "parent_id": job_id, "priority": sent.priority,
                   "replaced_task_nesting": self.nesting}  # fmt: skip
        return signature(self.task, args=(job_id, sent.first, sent.stop), options=options, immutable=True, app=app)

    def merge(self) -> Signature:
        """The chord's callback, under the job's id."""
        return signature(self.body, app=app)

    def describe(self, number: int) -> str:
        """The batch in words: "tiles 32-47"."""
        sent = self.batches[number]
        return f"{UNITS.get(self.task, 'units')} {sent.first}-{sent.stop - 1}"


def chord_key(group: str, suffix: str) -> str:
    """A key of a chord's state in the result backend (Celery's: .d its counted parts, .c its callback, .s its
    size)."""
    return app.backend.get_key_for_group(group, suffix)


@dataclass(frozen=True)
class Missing:
    """What a job's chord still lacks: the header tasks not counted (by their number), or its merge."""

    batches: list[int]
    merge: bool


def missing(sent: SentChord, counted: set[str], merged: bool) -> Missing:
    """What the chord `sent` lacks, from its state in the result backend.

    Args:
        sent: the chord as sent.
        counted: the parts Celery counted (its `.d` set: "task id:index").
        merged: its callback was sent (its `.c` claim is "done").

    Returns:
        The batches not counted, or the merge once every one is."""
    if merged:
        return Missing([], True)
    return Missing([n for n, batch in enumerate(sent.batches) if f"{batch.id}:{n}" not in counted], False)


class ChordTask(Task):
    """A task that may become its job's chord (`self.replace(chord(...))`): the chord is stored as sent first."""

    def on_replace(self, sig: Signature) -> Any:
        if isinstance(sig, chord):
            sent = SentChord.of(self.request.id, sig)
            store.put_chord(store_client(), self.request.id, sent.group, sent.to_json(), settings().tile_ttl)
        return super().on_replace(sig)


def message_id(payload: dict[str, Any]) -> str | None:
    """The task id a kombu message (its JSON as the Redis transport keeps it) carries."""
    return payload.get("headers", {}).get("id")


def in_broker(channel: Any, queues: list[str], ids: set[str]) -> set[str]:
    """Which of `ids` a message in the broker carries: queued (the Redis transport's list per queue and priority)
    or delivered and not acknowledged (its `unacked` hash: running, prefetched, or held for a countdown)."""
    found: set[str] = set()
    with channel.conn_or_acquire() as client:
        for name in {channel._q_for_pri(queue, step) for queue in queues for step in channel.priority_steps}:
            for start in range(0, client.llen(name), SCAN_EVERY):
                found.update(message_id(json.loads(raw)) for raw in client.lrange(name, start, start + SCAN_EVERY - 1))
        for _, raw in client.hscan_iter(channel.unacked_key, count=SCAN_EVERY):
            found.add(message_id(json.loads(raw)[0]))
    return ids & found


@dataclass(frozen=True)
class Seen:
    """A job as this node last saw it: its progress, since when (monotonic), and whether a message was found
    lost at the last look."""

    progress: tuple[Any, ...]
    since: float
    absent: bool = False


@dataclass(frozen=True)
class Stalled:
    """A job whose progress stood still for a stall period, with what its chord lacks."""

    job: str
    sent: SentChord
    lacking: Missing
    seen: Seen

    @property
    def ids(self) -> set[str]:
        """The task ids to look for in the broker: the job's own (its tiling task, merge or finish) and the lacking
        batches'."""
        return {self.job} | {self.sent.batches[n].id for n in self.lacking.batches}


@dataclass
class Watch:
    """This node's view of the jobs it watches, and what it does about a stalled one."""

    stall_s: float
    node: str
    seen: dict[str, Seen] = field(default_factory=dict)

    def look(self, channel: Any, queues: list[str]) -> None:
        """One look at every watched job; the broker is read once, for all the stalled ones."""
        client = store_client(patient=False)
        jobs = store.chord_jobs(client)
        self.seen = {job: seen for job, seen in self.seen.items() if job in jobs}
        stalled = [found for job in jobs if (found := self.stalled(client, job)) is not None]
        if stalled:
            present = in_broker(channel, queues, set().union(*(found.ids for found in stalled)))
            for found in stalled:
                self.judge(found, present)

    def stalled(self, client: redis.Redis, job: str) -> Stalled | None:
        """The job, if its progress stood still for a stall period and this node is the one to look after it (a
        claim: one node reads the broker for it, and sends again)."""
        group = store.get_chord(client, job, "group")
        if group is None:
            return None
        backend, now = app.backend.client, time.monotonic()
        with backend.pipeline(transaction=False) as pipe:
            pipe.scard(chord_key(group, ".d"))
            pipe.get(chord_key(group, ".c"))
            counted, claim = pipe.execute()
        progress = (store.progress(client, job), store.crop_progress(client, job), group, counted, claim)
        seen = self.seen.get(job)
        if seen is None or seen.progress != progress:
            self.seen[job] = Seen(progress, now)
            return None
        if now - seen.since < self.stall_s:
            return None
        text = store.get_chord(client, job)
        if text is None or not store.claim_repair(client, job, self.node, max(1, round(self.stall_s))):
            self.seen[job] = Seen(progress, now)  # ended, or another node looks after it for a stall period
            return None
        sent, parts = SentChord.from_json(text), {part.decode() for part in backend.smembers(chord_key(group, ".d"))}
        return Stalled(job, sent, missing(sent, parts, claim == b"done"), seen)

    def judge(self, found: Stalled, present: set[str]) -> None:
        """Send again what the stalled job lost, once it was found lost at two looks in a row (a message moves
        from a queue's list to the unacked hash between two commands); nothing if its work is merely waiting or
        running."""
        job, seen = found.job, found.seen
        lost = [n for n in found.lacking.batches if found.sent.batches[n].id not in present]
        if job in present or not (lost or found.lacking.merge):
            self.seen[job] = Seen(seen.progress, time.monotonic())
        elif not seen.absent:
            self.seen[job] = replace(seen, absent=True)
        else:
            self.send_again(job, found.sent, lost, found.lacking.merge)
            self.seen[job] = Seen(seen.progress, time.monotonic())

    def send_again(self, job: str, sent: SentChord, lost: list[int], merge: bool) -> None:
        """Send the lost messages of `job` again, saying so."""
        waited = f"no message queued or running for {self.stall_s:g} s"
        if merge:
            sent.merge().apply_async()
            log.warning("job %s: its merge (%s) was lost (%s): sent again", job, sent.body["task"], waited)
            return
        if app.backend.client.get(chord_key(sent.group, ".s")) is None:  # the chord's size was lost too
            app.backend.set_chord_size(sent.group, len(sent.batches))
        for number in lost:
            sent.batch(job, number).apply_async()
            log.warning("job %s: batch %s was lost (%s): sent again", job, sent.describe(number), waited)


class StallWatch(RepeatingStep):
    """The consumer step that looks at the watched jobs every `check_every(TILEREC_STALL_S)` seconds."""

    failure = "could not look for stalled jobs"

    def __init__(self, consumer: Any, **kwargs: Any) -> None:
        super().__init__(consumer, **kwargs)
        self.watch: Watch | None = None

    def start(self, consumer: Any) -> None:
        channel = consumer.task_consumer.channel
        stall_s = float(consumer.app.conf.tilerec_stall_s)
        if getattr(channel, "unacked_key", None) is None or stall_s <= 0:  # not a Redis transport, or turned off
            return
        self.watch = self.watch or Watch(stall_s, consumer.hostname)
        self.repeat(consumer, check_every(stall_s))

    def run(self, consumer: Any) -> None:
        assert self.watch is not None
        self.watch.look(consumer.task_consumer.channel, list(consumer.app.amqp.queues))


def check_every(stall_s: float) -> float:
    """How often a node looks at the watched jobs: a sixth of the stall period, between 0.5 and 5 s."""
    return min(5.0, max(0.5, stall_s / 6))
