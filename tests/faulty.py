"""Recognizers that misbehave on purpose, loaded by workers as `tests.faulty:…` (TILEREC_PLUGIN_MODULES).

They read QR codes like `qrcode`, except on tiles that contain the marker: a patch of pure red. `Held` instead
holds tiles at a known point until the test releases them (see `hold_gate`).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
from celery import current_app, signals

from pipeline.model import Detections
from pipeline.recognizers import get_recognizer

MARKER_BGR = (0, 0, 255)
DIE_PUBLISHING_THE_MERGE = "die-publishing-the-merge"  # flag files in the worker's allowed root
DIE_COUNTING_A_CHORD_PART = "die-counting-a-chord-part"
RELEASE = "release-the-held-tile"
TENANT = "tenant:"  # the keys another program fills the store with
SLOW_TILE_S = 0.05
RELEASE = "release"  # the file in a Held gate that lets its tiles go
HELD_LIMIT_S = 300.0  # a gate never released fails its tiles rather than hold a worker process for ever


def has_marker(tile: np.ndarray) -> bool:
    return tile.ndim == 3 and bool(np.all(tile == MARKER_BGR, axis=2).sum() >= 100)


class RaisesOnMarker:
    """QR codes; raises on tiles with the red marker"""

    def __call__(self, tile: np.ndarray) -> Detections:
        if has_marker(tile):
            raise ValueError("the red marker makes this recognizer fail")
        return get_recognizer("qrcode")(tile)


class CrashesOnMarker:
    """QR codes; kills its own worker process on tiles with the red marker"""

    def __call__(self, tile: np.ndarray) -> Detections:
        if has_marker(tile):
            os._exit(1)
        return get_recognizer("qrcode")(tile)


class ExhaustsMemoryOnMarker:
    """QR codes; on tiles with the red marker, runs out of memory for real: caps its process's address space just
    above what it uses (RLIMIT_AS), then asks for a gigabyte"""

    def __call__(self, tile: np.ndarray) -> Detections:
        if has_marker(tile):
            import resource

            with open("/proc/self/status") as status:
                used = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
            resource.setrlimit(resource.RLIMIT_AS, (used + 64 * 2**20, resource.getrlimit(resource.RLIMIT_AS)[1]))
            np.ones(2**30, dtype=np.uint8)
        return get_recognizer("qrcode")(tile)


class KilledOnMarker:
    """QR codes; on tiles with the red marker, allocates 256 MB and is killed, as the kernel's OOM killer would"""

    def __call__(self, tile: np.ndarray) -> Detections:
        if has_marker(tile):
            hog = np.ones(256 * 2**20, dtype=np.uint8)
            os.kill(os.getpid(), signal.SIGKILL)
            del hog
        return get_recognizer("qrcode")(tile)


class Slow:
    """QR codes, `seconds` late on every tile: jobs that run long enough to be cancelled or joined midway"""

    def __init__(self, seconds: float = SLOW_TILE_S) -> None:
        self.seconds = seconds

    def __call__(self, tile: np.ndarray) -> Detections:
        time.sleep(self.seconds)
        return get_recognizer("qrcode")(tile)


class Held:
    """Another recognizer's detections (`recognizer`), but every tile after the first `after` waits at a known point
    until the file `release` appears in the folder `gate`: jobs interrupted or joined mid-job by construction"""

    def __init__(self, gate: str = "", after: int = 0, recognizer: str = "qrcode") -> None:
        if not gate:
            raise ValueError("Held needs gate: the folder its tiles wait in")
        self.gate, self.after, self.recognize = Path(gate), after, get_recognizer(recognizer)

    def __call__(self, tile: np.ndarray) -> Detections:
        if entered(self.gate) > self.after:
            deadline = time.monotonic() + HELD_LIMIT_S
            while not (self.gate / RELEASE).exists():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"held for {HELD_LIMIT_S:.0f} s: nobody released {self.gate}")
                time.sleep(0.02)
        return self.recognize(tile)


def entered(gate: Path) -> int:
    """This tile's rank among all the tiles that reached `gate`, from 1: the first file `tile-N` this process
    creates (O_EXCL, so two processes never get the same rank)."""
    rank = 1
    while True:
        try:
            os.close(os.open(gate / f"tile-{rank}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return rank
        except FileExistsError:
            rank += 1


def holding(gate: Path, after: int = 0) -> bool:
    """Whether a tile is waiting at `gate` (more than `after` tiles reached it, and it is not released)."""
    return (gate / f"tile-{after + 1}").exists() and not (gate / RELEASE).exists()


def release(gate: Path) -> None:
    (gate / RELEASE).touch()


class DiesPublishingTheMerge:
    """QR codes; once the flag file DIE_PUBLISHING_THE_MERGE is in the allowed root, the first worker process to
    publish a merge kills itself: after Celery claimed the chord's callback, before the merge is in the broker"""

    def __init__(self) -> None:
        signals.before_task_publish.connect(
            _die_publishing, sender="tilerec.merge", dispatch_uid=DIE_PUBLISHING_THE_MERGE
        )

    def __call__(self, tile: np.ndarray) -> Detections:
        return get_recognizer("qrcode")(tile)


def _die_publishing(**_: object) -> None:
    _die_once(DIE_PUBLISHING_THE_MERGE)


class DiesCountingItsChordPart:
    """QR codes; once the flag file DIE_COUNTING_A_CHORD_PART is in the allowed root, the first worker process to
    count a batch for its chord kills itself just before (Celery would have stored the batch's SUCCESS by then)"""

    def __init__(self) -> None:
        backend = current_app.backend
        counted = backend.on_chord_part_return

        def dying(*args: object, **kwargs: object) -> None:
            _die_once(DIE_COUNTING_A_CHORD_PART)
            counted(*args, **kwargs)

        backend.on_chord_part_return = dying

    def __call__(self, tile: np.ndarray) -> Detections:
        return get_recognizer("qrcode")(tile)


def _die_once(flag: str) -> None:
    for root in os.environ.get("TILEREC_ALLOWED_ROOTS", "").split(os.pathsep):
        try:
            os.remove(os.path.join(root, flag))  # succeeds for one process only
        except OSError:
            continue
        os.kill(os.getpid(), signal.SIGKILL)


class HeldOnMarker:
    """QR codes; a tile with the red marker waits until the flag file RELEASE is in the allowed root: a job held
    running at a known point, with its tiles in the store"""

    def __call__(self, tile: np.ndarray) -> Detections:
        while has_marker(tile) and not _flagged(RELEASE):
            time.sleep(0.02)
        return get_recognizer("qrcode")(tile)


def _flagged(flag: str) -> bool:
    return any(os.path.exists(os.path.join(root, flag)) for root in os.environ.get("TILEREC_ALLOWED_ROOTS", "").split(
        os.pathsep) if root)  # fmt: skip


class FillsTheStoreOnMarker:
    """QR codes; on a tile with the red marker, the tile store's Redis fills up under the job: another program
    stores 4 MB (under TENANT), and Redis's limit is lowered 2 MB below what it uses, so it refuses every write until
    memory is freed (filling it to the byte would not last: Redis frees client buffers as it goes)"""

    def __call__(self, tile: np.ndarray) -> Detections:
        if has_marker(tile):
            import redis

            tenant = redis.Redis.from_url(current_app.conf.tilerec_store_url)
            for number in range(4):
                tenant.set(f"{TENANT}{number}", os.urandom(2**20))
            tenant.config_set("maxmemory", int(tenant.info("memory")["used_memory"]) - 2 * 2**20)
            tenant.close()
        return get_recognizer("qrcode")(tile)


class PayloadLabels:
    """QR codes labelled with their own payloads: a recognizer whose labels come from the image, as OCR lines and
    names will (hostile content reaches every output through labels as well as texts)"""

    def __call__(self, tile: np.ndarray) -> Detections:
        found = get_recognizer("qrcode")(tile)
        labels = [text or "qrcode" for text in found.texts]
        return Detections(found.xyxy, found.scores, labels, found.texts, found.points, found.cut, obb=found.obb)


HOLD_ON_RED = "hold-on-red"  # flag file: while it exists, a process that meets a red frame waits there
HELD = "held"  # the file that process writes, holding its pid


def has_red(tile: np.ndarray) -> bool:
    """A patch of red, within a video codec's rounding of pure red."""
    if tile.ndim != 3:
        return False
    blue, green, red = (tile[:, :, channel].astype(int) for channel in range(3))
    return bool(((red > 180) & (green < 80) & (blue < 80)).sum() >= 100)


class HoldsOnRed:
    """QR codes; while the flag file HOLD_ON_RED is in the allowed root, a process that meets a frame with a red
    patch writes its pid to HELD there and waits until the flag goes: work held at a known point"""

    def __call__(self, tile: np.ndarray) -> Detections:
        if has_red(tile):
            for root in os.environ.get("TILEREC_ALLOWED_ROOTS", "").split(os.pathsep):
                flag = os.path.join(root, HOLD_ON_RED)
                if root and os.path.exists(flag):
                    with open(os.path.join(root, HELD), "w") as held:
                        held.write(str(os.getpid()))
                    while os.path.exists(flag):
                        time.sleep(0.02)
        return get_recognizer("qrcode")(tile)


class CrashesOnRed:
    """QR codes; kills its own worker process on frames with a red patch"""

    def __call__(self, tile: np.ndarray) -> Detections:
        if has_red(tile):
            os._exit(1)
        return get_recognizer("qrcode")(tile)


class UnnamedMarkers:
    """ArUco markers with their ids forgotten: nothing but box overlap can keep a marker's track (no payload joins
    its pieces)"""

    def __call__(self, tile: np.ndarray) -> Detections:
        found = get_recognizer("aruco")(tile)
        return Detections(found.xyxy, found.scores, found.labels)
