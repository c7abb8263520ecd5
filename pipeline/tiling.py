"""Overlapping tile grid with SAHI's semantics: fixed-size windows, the last row and column flush to the edge."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Window:
    """One tile of the grid: its index in the job and its place in the image, in pixels."""

    index: int
    x: int
    y: int
    width: int
    height: int

    @property
    def x2(self) -> int:
        return self.x + self.width

    @property
    def y2(self) -> int:
        return self.y + self.height

    def to_list(self) -> list[int]:
        return [self.index, self.x, self.y, self.width, self.height]

    @classmethod
    def from_list(cls, values: list[int] | tuple[int, ...]) -> Window:
        index, x, y, width, height = (int(v) for v in values)
        return cls(index, x, y, width, height)


def validate_tiling(tile: object, overlap: object) -> tuple[int, float]:
    """Return (tile, overlap) as int and float, or raise ValueError saying what is wrong."""
    if isinstance(tile, bool) or not isinstance(tile, int | float) or tile != int(tile) or tile <= 0:
        raise ValueError(f"tile must be a positive whole number of pixels, got {tile!r}")
    if isinstance(overlap, bool) or not isinstance(overlap, int | float) or not 0 <= overlap < 1:
        raise ValueError(f"overlap must be a ratio in [0, 1), got {overlap!r}")
    return int(tile), float(overlap)


def _starts(size: int, tile: int, step: int) -> list[int]:
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, step))
    starts.append(size - tile)
    return starts


def grid(height: int, width: int, tile: int = 640, overlap: float = 0.2) -> list[Window]:
    """Windows covering an image of height x width, row by row.

    As SAHI's `get_slice_bboxes`: step = tile - int(tile * overlap). The last row and column are full-size
    windows pushed flush against the bottom and right edges, so no window is padded or a sliver; a side shorter
    than a tile is one window of that side's length.

    Args:
        height, width: the image's size in pixels.
        tile: the side of a window in pixels.
        overlap: the share of a window its neighbour overlaps, in [0, 1).

    Returns:
        The windows, row by row, each with its index in that order.
    """
    tile, overlap = validate_tiling(tile, overlap)
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    step = max(1, tile - int(tile * overlap))
    tile_h, tile_w = min(tile, height), min(tile, width)
    windows = []
    for y in _starts(height, tile, step):
        for x in _starts(width, tile, step):
            windows.append(Window(len(windows), x, y, tile_w, tile_h))
    return windows


SHARES_PER_PROCESS = 8  # a big job's full batches per tile process of the cluster (then the tapered tail)
MAX_BATCH_MS = 10_000.0  # ... each holding at most this much work: a cluster that grows mid-job still gets batches
# the tapered tail's smallest batch holds this much work: about 3 times a batch task's own cost (7 ms of CPU and
# 3-5 ms of waits, docs/performance.md), where one more halving would cost its tasks more than it evens the finish
TAIL_MIN_MS = 30.0


def auto_batch_size(
    tiles: int, tile_cost_ms: float, target_batch_ms: float = 400.0, min_batches: int = 16, processes: int = 0
) -> int:
    """Tiles per batch: enough that a batch's work (`target_batch_ms`) dwarfs a task's own cost, yet at least
    `min_batches` batches (where there are that many tiles) so every worker gets a share.

    `processes`, the tile processes of the whole cluster (0: unknown): a job with more work than SHARES_PER_PROCESS
    such batches per process gets larger ones (up to MAX_BATCH_MS of work), SHARES_PER_PROCESS per process. Every
    task costs Celery and Redis the same whatever its size, so at many processes small batches only multiply that
    cost (docs/scaling.md); the tapered tail still lets the processes finish together."""
    by_cost = max(1, math.ceil(target_batch_ms / max(tile_cost_ms, 1e-3)))
    by_spread = max(1, math.ceil(tiles / min_batches))
    by_share = math.ceil(tiles / (SHARES_PER_PROCESS * processes)) if processes > 0 else 1
    by_share = min(by_share, max(1, math.floor(MAX_BATCH_MS / max(tile_cost_ms, 1e-3))))
    return min(max(by_cost, by_share), by_spread)


def batches(windows: list[Window], size: int) -> list[list[Window]]:
    return [windows[start : start + size] for start in range(0, len(windows), size)]


def tapered_sizes(total: int, size: int, lanes: int = 1, smallest: int = 1) -> list[int]:
    """Batch sizes summing to `total`: `size` each, except a tail of halving batches (…, size/4, size/2… 2, 1),
    `lanes` of each size (the processes that will be finishing together; 1: as many as the halvings), the last of
    them `smallest` (where a batch must hold some work to be worth its task).

    Workers take batches in order, so the last ones decide when a job ends; small last batches let every worker
    finish at about the same time (guided self-scheduling) for a few more batches: about lanes × log2(size). A
    first batch smaller than `size` takes the remainder."""
    tail, part, left = [], smallest, total
    while part < size and left > 0:
        for _ in range(lanes):
            if left > 0:
                tail.append(min(part, left))
                left -= tail[-1]
        part *= 2
    body = [size] * (left // size)
    if left % size:
        body.insert(0, left % size)
    return body + tail[::-1]


def tail_smallest(tile_cost_ms: float, size: int) -> int:
    """The tiles of a tapered tail's smallest batch: TAIL_MIN_MS of work, at most a full batch (`size`)."""
    return max(1, min(size, math.ceil(TAIL_MIN_MS / max(tile_cost_ms, 1e-3))))


def tapered_batches(windows: list[Window], size: int, lanes: int = 1, smallest: int = 1) -> list[list[Window]]:
    """`windows` cut into consecutive batches of `tapered_sizes`."""
    cut, start = [], 0
    for length in tapered_sizes(len(windows), size, lanes, smallest):
        cut.append(windows[start : start + length])
        start += length
    return cut


def row_ends(windows: list[Window]) -> set[int]:
    """The counts of `windows` (in grid order) at which a row of tiles ends."""
    return {w.index + 1 for w, after in itertools.pairwise([*windows, None]) if after is None or after.y != w.y}


def row_batches(
    windows: list[Window], size: int, taper: bool = True, lanes: int = 1, smallest: int = 1
) -> list[list[Window]]:
    """`windows` (in grid order) cut into batches of at most `size` that never span two rows of tiles; the last row
    tapered as `tapered_batches` (with `taper`).

    For an image decoded while its tiles are recognized (a streamed PNG): a row's tiles are ready together, once
    the decoding reaches the row's bottom, and a batch is ready with its last tile; a batch reaching into the next
    row would keep its task waiting for that row while the tiles it already has could be recognized."""
    rows = [list(row) for _, row in itertools.groupby(windows, key=lambda window: window.y)]
    if not rows:
        return []
    cut = [batch for row in rows[:-1] for batch in batches(row, size)]
    return cut + (tapered_batches(rows[-1], size, lanes, smallest) if taper else batches(rows[-1], size))
