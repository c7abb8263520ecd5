"""Benchmark profiles: what is measured at which sizes, how often. A profile is plain data so the JSON records it."""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

CODE_RECOGNIZERS = ("qrcode", "aruco", "barcode")
DNN_RECOGNIZERS = ("faces-dnn", "objects")
CHEAP_RECOGNIZER = "aruco"
BATCH_SIZES: tuple[int | str, ...] = (1, 2, 4, 8, 16, "auto")


def vm_hwm_mb(pid: int) -> float | None:
    """Peak resident set (VmHWM) of a process in MiB, from /proc; None if it is gone. Not `ru_maxrss`: Linux
    carries that across fork and exec, so a fresh process would report at least its parent's size."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return None


def cores() -> int:
    """Cores this process may run on (the affinity mask, not the host's count, so a pinned container is honest)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


@dataclass(frozen=True)
class Profile:
    """Everything one run measures. Sizes are square scene sides in pixels."""

    name: str
    accuracy_sizes: tuple[int, ...]  # code scenes (QR, ArUco, EAN-13 mixed) at each size
    photo_sizes: tuple[int, ...]  # face and object photo scenes (when the DNN recognizers are registered)
    speed_size: int  # the side-by-side speed comparison runs on this size's scenes
    memory_sizes: tuple[int, ...]
    workers: tuple[int, ...]  # W values: distinct worker processes with --concurrency W
    reps: int  # timed repetitions of each speed variant (the median is reported)
    batch_sizes: tuple[int | str, ...]
    batch_recognizers: tuple[str, ...]  # the tiles-per-task curve is drawn for these (filtered by availability)
    recognizers: tuple[str, ...]  # wanted; DNN ones are used only when registered
    latency_reps: int
    whole_max_pixels: int  # whole-image passes above this are not run (YuNet on 16000² needs ~19 GB)
    whole_timeout_s: float  # a whole-image pass still running after this is reported as timed out
    whatif_recognizers: tuple[str, ...] = ()  # the what-if phase runs the first two of these that are usable
    per_megapixel: float = 2.0  # code scene density
    seed: int = 5
    tile: int = 640
    overlap: float = 0.2
    job_timeout_s: float = 900.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _default_workers() -> tuple[int, ...]:
    return tuple(sorted({1, cores()}))


PROFILES: dict[str, Profile] = {
    # a few seconds of work per stage: checks the code paths, its numbers are not to be quoted
    "smoke": Profile(
        name="smoke",
        accuracy_sizes=(1000,),
        photo_sizes=(),
        speed_size=1000,
        memory_sizes=(1000,),
        workers=(1,),
        reps=1,
        batch_sizes=(1, "auto"),
        batch_recognizers=(CHEAP_RECOGNIZER,),
        recognizers=(CHEAP_RECOGNIZER,),
        latency_reps=2,
        whole_max_pixels=1000 * 1000,
        whole_timeout_s=60,
        per_megapixel=12.0,
    ),
    # a couple of minutes: every measurement on small scenes
    "quick": Profile(
        name="quick",
        accuracy_sizes=(1000, 2000),
        photo_sizes=(2000,),
        speed_size=2000,
        memory_sizes=(1000, 2000),
        workers=_default_workers(),
        reps=1,
        batch_sizes=(1, 4, 16, "auto"),
        batch_recognizers=(CHEAP_RECOGNIZER,),
        recognizers=CODE_RECOGNIZERS + DNN_RECOGNIZERS,
        latency_reps=5,
        whatif_recognizers=(CHEAP_RECOGNIZER, "objects", "qrcode"),
        whole_max_pixels=2000 * 2000,
        whole_timeout_s=60,
        per_megapixel=4.0,
    ),
    # the figures to quote: 1000² to 16000², the 8000² speed scene, 4000² and 16000² memory
    "full": Profile(
        name="full",
        accuracy_sizes=(1000, 4000, 8000, 16000),
        photo_sizes=(1000, 4000, 8000),
        speed_size=8000,
        memory_sizes=(4000, 16000),
        workers=_default_workers(),
        reps=3,  # the median of 3, interleaved: one slow pass on a VM moves a median of 2 (their mean) by half
        batch_sizes=BATCH_SIZES,
        batch_recognizers=(CHEAP_RECOGNIZER, "objects"),
        recognizers=CODE_RECOGNIZERS + DNN_RECOGNIZERS,
        latency_reps=10,
        whatif_recognizers=(CHEAP_RECOGNIZER, "objects", "qrcode"),
        whole_max_pixels=8000 * 8000,
        whole_timeout_s=90,
    ),
}


def profile(name: str, **overrides: Any) -> Profile:
    """A named profile with some fields replaced (None values are ignored, so argparse defaults can pass through)."""
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; known: {', '.join(PROFILES)}")
    chosen = {key: value for key, value in overrides.items() if value is not None}
    return replace(PROFILES[name], **chosen)
