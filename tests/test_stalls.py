"""Jobs that lose a message (a failover, a flushed queue) repair themselves (tasks/stalls.py), and jobs that merely
wait behind others are left alone. Real redis-server and celery worker processes; a message is lost by deleting it
from the Redis transport's list while no worker consumes that queue."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import cv2
import pytest

from pipeline.scenes.codes import qr_scene
from pipeline.tiling import grid
from tasks.local import RedisServer, Worker
from tasks.stalls import SentChord, check_every, missing
from tests.conftest import IMAGES_ROOT, tilerec_left
from tests.faulty import holding, release
from tests.scenes import assert_each_code_once
from tests.test_faults import Client, env_for
from tests.test_reliability import wait_for
from tests.test_stages import RECTS, assert_crops_exact, scene_file

pytestmark = pytest.mark.cluster  # every test here starts Redis and Celery workers of its own

STALL_S = "2"  # the workers' TILEREC_STALL_S: short, so a lost message is sent again within seconds
JOBS, TILES = "tilerec", "tilerec.tiles"
PRIORITY_SEP = "\x06\x16"  # kombu's Redis transport: queue NAME's priority P is the list NAME + SEP + P (0: NAME)
LOST = "was lost (no message queued or running for 2 s): sent again"


@pytest.fixture(scope="module")
def scene():
    """12 tiles of QR codes with known payloads, 4 batches of 3."""
    truth = qr_scene(2000, 1500, count=6, seed=34)
    path = IMAGES_ROOT / "stalls-qr.png"
    cv2.imwrite(str(path), truth.image)
    assert len(grid(1500, 2000)) == 12
    return truth, str(path)


def queued(client, queue: str) -> list[tuple[bytes, bytes, dict]]:
    """The messages queued on `queue`, at every priority: (list, raw message, its headers)."""
    lists = [queue.encode()] + [f"{queue}{PRIORITY_SEP}{p}".encode() for p in range(1, 10)]
    return [(name, raw, json.loads(raw)["headers"]) for name in lists for raw in client.lrange(name, 0, -1)]


def lose(client, name: bytes, raw: bytes) -> None:
    """The message deleted from its list, as a failover that never replicated it would."""
    assert client.lrem(name, 1, raw) == 1


class Cluster:
    """A Redis, a node for the jobs queue and one for the tiles queue, started when the test says."""

    def __init__(self, folder: Path, **settings: str) -> None:
        self.redis = RedisServer().start()
        self.env = env_for(self.redis.url, TILEREC_STALL_S=STALL_S, **settings)
        self.logs = [folder / "jobs.log", folder / "tiles.log"]
        self.jobs = Worker(self.redis.url, 1, queues=[JOBS], env=self.env, log_file=str(self.logs[0]))
        self.tiles = Worker(self.redis.url, 1, queues=[TILES], env=self.env, log_file=str(self.logs[1]))

    def log(self) -> str:
        """Both nodes' logs, checked to hold no failed look for stalled jobs."""
        text = "".join(path.read_text(errors="replace") for path in self.logs if path.exists())
        assert "could not look for stalled jobs" not in text, text[-3000:]
        return text

    def stop(self) -> None:
        self.jobs.stop()
        self.tiles.stop()
        self.redis.stop()


@pytest.fixture
def cluster(tmp_path) -> Iterator[Cluster]:
    made = Cluster(tmp_path)
    try:
        yield made
    finally:
        made.stop()


def sent_chord(client, job_id: str) -> SentChord:
    """The job's chord as its tiling task stored it, once it did."""
    wait_for(lambda: client.exists(f"tilerec:job:{job_id}:chord"), timeout=60)
    return SentChord.from_json(client.hget(f"tilerec:job:{job_id}:chord", "sent").decode())


def one(client, queue: str, task_id: str) -> tuple[bytes, bytes, dict] | None:
    """The message queued on `queue` for the task `task_id`, if one is."""
    return next((m for m in queued(client, queue) if m[2]["id"] == task_id), None)


def assert_sent_as_before(original: bytes, again: bytes, sender: set[str]) -> None:
    """A message sent again is the lost one: the same headers (task id, group, index in the group, root, arguments),
    priority, route and body (arguments and the chord it carries); only what names its sender (`sender`: the
    process; a merge's parent, the batch that sent it) and its delivery tag differ."""
    first, second = json.loads(original), json.loads(again)
    unlike = {k for k in first["headers"] | second["headers"] if first["headers"].get(k) != second["headers"].get(k)}
    assert unlike <= sender, unlike
    for key in ("priority", "delivery_info", "correlation_id"):
        assert first["properties"][key] == second["properties"][key], key
    assert body(original) == body(again)


def body(raw: bytes) -> list:
    """A task message's body: its arguments and what it carries (the chord)."""
    return json.loads(base64.b64decode(json.loads(raw)["body"]))


@pytest.mark.parametrize("lost", ["batch", "queue", "merge"])
def test_a_job_whose_message_was_lost_sends_it_again_and_completes(cluster, scene, lost):
    """One batch message deleted from the broker before any node takes it, every message of the tiles queue (as a
    flush would), or the merge message once the last batch sent it: a node sends the very messages again, the job
    completes with every code once, the log says what was sent again, and nothing of the job is left. Without the
    repair the job waits until its client gives up (180 s)."""
    truth, path = scene
    server = cluster.redis.client()
    cluster.jobs.start()
    client = Client(cluster.redis.url, path, "qrcode", batch_size=3)
    sent = sent_chord(server, client.id)
    assert len(sent.batches) == 4
    wait_for(lambda: len(queued(server, TILES)) == 4, timeout=60)
    # the jobs node watches and sends batches again, to a queue no node takes yet
    queue, numbers = TILES, {"batch": [2], "queue": [0, 1, 2, 3]}.get(lost, [])
    said = [f"job {client.id}: batch tiles {3 * n}-{3 * n + 2} {LOST}" for n in numbers]
    if lost == "merge":  # sent by the tiles node, while no node takes the jobs queue; that node sends it again
        queue, said = JOBS, [f"job {client.id}: its merge (tilerec.merge) {LOST}"]
        cluster.jobs.stop()  # warm shutdown: its tiling task ends first
        cluster.tiles.start()
        wait_for(lambda: one(server, queue, client.id) is not None, timeout=60)
    ids = [client.id] if lost == "merge" else [sent.batches[n].id for n in numbers]
    originals = {task_id: one(server, queue, task_id) for task_id in ids}
    for name, raw, _ in originals.values():
        lose(server, name, raw)
    assert not any(one(server, queue, task_id) for task_id in ids)
    wait_for(lambda: all(one(server, queue, task_id) for task_id in ids), timeout=60)
    sender = {"origin", "parent_id"} if lost == "merge" else {"origin"}
    for task_id, (_, raw, _) in originals.items():
        assert_sent_as_before(raw, one(server, queue, task_id)[1], sender)
    (cluster.jobs if lost == "merge" else cluster.tiles).start()
    outcome = client.wait()
    assert "result" in outcome, outcome
    assert_each_code_once(outcome["result"]["detections"], truth.truths)
    assert outcome["result"]["failed_tiles"] == []
    log = cluster.log()
    assert all(log.count(line) == 1 for line in said), log[-3000:]
    assert log.count("sent again") == len(said)
    wait_for(lambda: tilerec_left(server) == [], timeout=20)


def test_a_lost_crop_batch_of_a_second_stage_is_sent_again(tmp_path):
    """The merge of a job with a second stage becomes a chord of crop batches: one of them lost before any node
    takes it is sent again, and every crop is measured exactly (the scene's own pixels)."""
    image, path = scene_file("stalls-staged.png", seed=34)
    cluster = Cluster(tmp_path, TILEREC_PLUGIN_MODULES="tests.shaped,tests.staged")
    try:
        server = cluster.redis.client()
        cluster.jobs.start()
        client = Client(cluster.redis.url, path, "tests.staged:DarkBlobs", batch_size=2, crop_batch_size=1)
        tiles = sent_chord(server, client.id)
        wait_for(lambda: len(queued(server, TILES)) == len(tiles.batches), timeout=60)
        cluster.jobs.stop()  # its tiling task ended; the merge waits in the jobs queue once the tiles are done
        cluster.tiles.start()
        wait_for(lambda: one(server, JOBS, client.id) is not None, timeout=60)
        cluster.tiles.stop()
        cluster.jobs.start()  # the merge sends the crop batches, which no node takes until the tiles node is back
        wait_for(lambda: sent_chord(server, client.id).task == "tilerec.recognize_crops", timeout=60)
        crops = sent_chord(server, client.id)
        assert len(crops.batches) == len(RECTS)
        wait_for(lambda: len(queued(server, TILES)) == len(crops.batches), timeout=60)
        name, original, _ = one(server, TILES, crops.batches[1].id)
        lose(server, name, original)
        wait_for(lambda: one(server, TILES, crops.batches[1].id) is not None, timeout=60)
        assert_sent_as_before(original, one(server, TILES, crops.batches[1].id)[1], {"origin"})
        cluster.tiles.start()
        outcome = client.wait()
        assert "result" in outcome, outcome
        assert_crops_exact(outcome["result"], image)
        assert cluster.log().count(f"job {client.id}: batch crops 1-1 {LOST}") == 1, cluster.log()[-3000:]
        assert cluster.log().count("sent again") == 1
        wait_for(lambda: tilerec_left(server) == [], timeout=20)
    finally:
        cluster.stop()


def test_a_job_queued_behind_another_is_never_sent_again(cluster, scene, tmp_path):
    """A job whose batches wait behind another job's batch, held at a known point for several stall periods on
    the one tile process: nothing is sent again, and both jobs complete with every code once."""
    truth, path = scene
    gate = tmp_path / "gate"
    gate.mkdir()
    cluster.jobs.start()
    cluster.tiles.start()
    server = cluster.redis.client()
    held = Client(cluster.redis.url, path, "tests.faulty:Held", batch_size=3, gate=str(gate))
    try:
        wait_for(lambda: holding(gate), timeout=60)
        queued_job = Client(cluster.redis.url, path, "qrcode", batch_size=3)
        sent = sent_chord(server, queued_job.id)
        wait_for(lambda: {h["id"] for _, _, h in queued(server, TILES)} >= {b.id for b in sent.batches}, timeout=60)
        # several stall periods pass with the queued job's batches waiting (and the held job's)
        with pytest.raises(AssertionError):
            wait_for(lambda: "sent again" in cluster.log(), timeout=4 * float(STALL_S), step=0.2)
    finally:
        release(gate)
    for client in (held, queued_job):
        outcome = client.wait()
        assert "result" in outcome, outcome
        assert_each_code_once(outcome["result"]["detections"], truth.truths)
    assert "sent again" not in cluster.log()
    wait_for(lambda: tilerec_left(server) == [], timeout=20)


def test_what_a_chord_lacks_is_its_uncounted_parts_then_its_merge():
    batches = [["a", 0, 3, 1], ["b", 3, 6, 2], ["c", 6, 9, 2]]
    sent = SentChord.from_json(json.dumps({"task": "tilerec.recognize_tiles", "group": "g", "body": {}, "root": "j",
                                           "nesting": 1, "batches": batches}))  # fmt: skip
    assert missing(sent, set(), False).batches == [0, 1, 2]
    assert missing(sent, {"a:0", "c:2"}, False).batches == [1]
    assert missing(sent, {"b:0"}, False).batches == [0, 1, 2]  # a part is counted by its id and its index
    lacking = missing(sent, set(), True)
    assert lacking.merge and lacking.batches == []
    assert sent.describe(1) == "tiles 3-5"
    assert [check_every(s) for s in (1, 2, 12, 60, 600)] == [0.5, 0.5, 2.0, 5.0, 5.0]
