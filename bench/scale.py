"""`python -m bench.scale [--processes 2,8,32,64] [--quick] [--out DIR]`: tilerec's orchestration at many processes.

A private redis-server and real `celery worker` nodes (prefork, `--per-node` processes each, as on several
machines) recognize with `bench.scale:SleepTile`, a recognizer whose tile cost is a sleep: the CPU is left to Redis,
Celery and tilerec, so what is measured is the orchestration, never the recognition. It is allowed for these
workers only (TILEREC_PLUGIN_MODULES=bench.scale); the product's registry does not list it.

For each number of processes P, on fresh nodes (one warm-up job first, as on a long-lived cluster, which also
records the tile cost the batch planner uses):
  big job      one job of `--tiles` tiles (a tiled TIFF read window by window, as slides and COGs are):
               efficiency = ideal time (tiles × tile cost / P) over the measured submit-to-result time
  small jobs   `--jobs` one-tile jobs sent at once: jobs/s, and each job's latency (submit to its result)
  latency      `--latency-jobs` one-tile jobs one at a time: the orchestration's own latency on an idle cluster
Around each phase: Redis commands, bytes and CPU per tile (INFO commandstats, stats, cpu before and after), and
the CPU seconds of Redis, the nodes' main processes (Celery's consumers), their pool processes (the tasks: tilerec's
code and Celery's tracer around it), this client, and the whole machine (others' work shows as the difference).
Then the merge of `--detections` synthetic detections in a fresh process: reading the records from Redis, decoding
them and `assemble` (placing and merging), with its time and peak memory.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import resource
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from bench.config import vm_hwm_mb
from pipeline.model import Detections

RECOGNIZER = "bench.scale:SleepTile"
TILE = 64  # pixels: small tiles make a 10,000-tile image small on disk; the sleep, not the pixels, is the cost
TIFF_TILE = 256
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
READY = ("SUCCESS", "FAILURE", "REVOKED")
REPO = Path(__file__).resolve().parents[1]


class SleepTile:
    """sleeps `ms` per tile and finds one box in its middle (the scale bench's recognizer: no CPU of its own)"""

    cost_ms = 200.0

    def __init__(self, ms: float = 200.0) -> None:
        self.seconds = ms / 1000

    def __call__(self, tile: np.ndarray) -> Detections:
        time.sleep(self.seconds)
        height, width = tile.shape[:2]
        return Detections.from_xywh([[width / 4, height / 4, width / 2, height / 2]], [1.0], "tile")


@dataclass(frozen=True)
class Profile:
    processes: tuple[int, ...] = (2, 8, 32, 64)
    tiles: int = 10_000
    tile_ms: float = 200.0
    jobs: int = 1000
    latency_jobs: int = 50
    detections: int = 1_000_000
    per_node: int = 8
    timeout_s: float = 3600.0


QUICK = Profile(tiles=1000, jobs=200, latency_jobs=20, detections=100_000, timeout_s=900.0)


def write_image(path: Path, tiles: int, seed: int = 0) -> tuple[int, int]:
    """A grey noise TIFF (tiled, so tile tasks read their own windows) of about `tiles` TILE² tiles (a square grid,
    rounded up); noise, so no tile is blank. Returns its (columns, rows) of tiles."""
    import tifffile

    side = math.ceil(math.sqrt(tiles))
    rows = math.ceil(tiles / side)
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (rows * TILE, side * TILE), dtype=np.uint8)
    tifffile.imwrite(path, image, photometric="minisblack", tile=(TIFF_TILE, TIFF_TILE))
    return side, rows


# --- CPU and Redis accounting ---------------------------------------------------------------------------------


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), from /proc; 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime: fields 14 and 15 of stat(5)


def machine_cpu_s() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle, iowait
    return (sum(values) - idle) / CLOCK_TICKS, sum(values) / CLOCK_TICKS


@dataclass
class Snapshot:
    """Counters at one moment: CPU seconds by role, the machine's, and Redis's own statistics."""

    at: float
    redis_cpu: float
    consumers: float
    pools: float
    client: float
    machine_busy: float
    machine_total: float
    commands: dict[str, int]
    net_in: int
    net_out: int


def snapshot(client: Any, redis_pid: int, nodes: Sequence[Any], children: dict[int, list[int]]) -> Snapshot:
    info = client.info("all")
    usage = resource.getrusage(resource.RUSAGE_SELF)
    busy, total = machine_cpu_s()
    commands = {key.removeprefix("cmdstat_"): int(value["calls"]) for key, value in info.items()
                if key.startswith("cmdstat_")}  # fmt: skip
    return Snapshot(
        at=time.time(),
        redis_cpu=process_cpu_s(redis_pid),
        consumers=sum(process_cpu_s(node.process.pid) for node in nodes),
        pools=sum(process_cpu_s(pid) for pids in children.values() for pid in pids),
        client=usage.ru_utime + usage.ru_stime,
        machine_busy=busy,
        machine_total=total,
        commands=commands,
        net_in=int(info["total_net_input_bytes"]),
        net_out=int(info["total_net_output_bytes"]),
    )


def usage(before: Snapshot, after: Snapshot, tiles: int, cores: int) -> dict[str, Any]:
    """What a phase cost: CPU seconds by role and as a share of the machine's cores over its wall time, Redis
    commands (the busiest ones), and per tile: commands, bytes in and out, Redis CPU."""
    wall = after.at - before.at
    seconds = {
        "redis": after.redis_cpu - before.redis_cpu,
        "celery_consumers": after.consumers - before.consumers,
        "task_processes": after.pools - before.pools,
        "client": after.client - before.client,
    }
    machine = after.machine_busy - before.machine_busy
    seconds["others"] = max(0.0, machine - sum(seconds.values()))  # other users of this shared machine
    calls = {name: after.commands.get(name, 0) - before.commands.get(name, 0) for name in after.commands}
    calls = {name: count for name, count in sorted(calls.items(), key=lambda item: -item[1]) if count > 0}
    per = max(1, tiles)
    return {
        "wall_s": wall,
        "cpu_s": seconds,
        "core_share": {name: value / (wall * cores) for name, value in seconds.items()},
        "machine_busy_share": machine / ((after.machine_total - before.machine_total) or 1),
        "commands": calls,
        "per_tile": {
            "commands": sum(calls.values()) / per,
            "bytes_in": (after.net_in - before.net_in) / per,
            "bytes_out": (after.net_out - before.net_out) / per,
            "redis_cpu_ms": 1000 * seconds["redis"] / per,
            "worker_cpu_ms": 1000 * (seconds["celery_consumers"] + seconds["task_processes"]) / per,
        },
    }


# --- a cluster of several nodes -------------------------------------------------------------------------------


def node_sizes(processes: int, per_node: int) -> list[int]:
    """`processes` split into nodes of at most `per_node`, as evenly as possible."""
    count = math.ceil(processes / per_node)
    return [processes // count + (1 if k < processes % count else 0) for k in range(count)]


def _date_done(meta: dict[str, Any]) -> float:
    when = datetime.fromisoformat(meta["date_done"])
    return (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp()


def wait_all(client: Any, ids: Sequence[str], timeout: float, poll_s: float = 0.05) -> dict[str, dict[str, Any]]:
    """Each job's final result meta (status, result, date_done) from the result backend, polled with MGET."""
    pending, done = list(ids), {}
    deadline = time.monotonic() + timeout
    while pending:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(pending)} of {len(ids)} jobs not done within {timeout:.0f} s")
        for start in range(0, len(pending), 500):
            chunk = pending[start : start + 500]
            for job_id, raw in zip(chunk, client.mget([f"celery-task-meta-{i}" for i in chunk]), strict=True):
                if raw is not None and (meta := json.loads(raw))["status"] in READY:
                    done[job_id] = meta
        pending = [job_id for job_id in pending if job_id not in done]
        if pending:
            time.sleep(poll_s)
    return done


def _failed(metas: dict[str, dict[str, Any]]) -> list[str]:
    return [str(meta["result"])[:200] for meta in metas.values() if meta["status"] != "SUCCESS"]


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def run_size(
    processes: int, profile: Profile, folder: Path, images: tuple[Path, Path], cores: int, tree: Path = REPO
) -> dict[str, Any]:
    """One cluster of `processes` worker processes running the code of `tree` (a checkout of tilerec: its
    `tasks` and `pipeline` come first on the workers' path): the big job, the small jobs and the latency."""
    from bench.cluster import TreeWorker, client_app
    from tasks.local import RedisServer

    big_image, small_image = images
    options = {"tile": TILE, "overlap": 0.0, "ms": profile.tile_ms}
    with RedisServer(options=["--maxmemory-policy", "noeviction"]) as server:
        env = {"TILEREC_RESULT_BACKEND": server.url, "TILEREC_PLUGIN_MODULES": "bench.scale",
               "TILEREC_ALLOWED_ROOTS": str(folder)}  # fmt: skip
        sizes = node_sizes(processes, profile.per_node)
        logs = [str(folder / f"worker-P{processes}-{k}.log") for k in range(len(sizes))]
        nodes = [TreeWorker(server.url, size, env=env, name=f"scale{k}", log_file=logs[k], tree=tree)
                 for k, size in enumerate(sizes)]  # fmt: skip
        app = client_app(server.url)
        try:
            for node in nodes:
                node.start(wait=False)
            for node in nodes:
                node.wait_ready(120)
            client = server.client()
            assert server.process is not None
            send = _sender(app, options)
            warm = send(str(big_image), {"batch_size": 1, "roi": _first_rows(big_image, 2 * processes)})
            _check(wait_all(client, [warm], profile.timeout_s))
            children = {node.process.pid: node.child_pids() for node in nodes}

            def measure(phase: Callable[[], dict[str, Any]], tiles: int) -> dict[str, Any]:
                before = snapshot(client, server.process.pid, nodes, children)
                out = phase()
                out["usage"] = usage(before, snapshot(client, server.process.pid, nodes, children), tiles, cores)
                return out

            offsets = [Path(log).stat().st_size for log in logs]
            big = measure(lambda: _big_job(client, send, big_image, processes, profile), profile.tiles)
            big["lost"] = where_time_went(logs, offsets, big, processes, profile.tile_ms)
            small = measure(lambda: _small_jobs(client, send, small_image, processes, profile), profile.jobs)
            latency = _latency(client, send, small_image, profile)
        finally:
            app.close()
            for node in nodes:
                node.stop()
    return {"processes": processes, "tree": str(tree), "nodes": sizes, "load_average": os.getloadavg(), "big_job": big,
            "small_jobs": small, "latency": latency}  # fmt: skip


def _first_rows(image: Path, tiles: int) -> list[int]:
    """The roi of the image's first rows of tiles holding at least `tiles` tiles."""
    import tifffile

    with tifffile.TiffFile(image) as tiff:
        height, width = tiff.pages[0].shape[:2]
    return [0, 0, width, min(height, TILE * math.ceil(tiles / (width // TILE)))]


def _sender(app: Any, options: dict[str, Any]) -> Callable[[str, dict[str, Any]], str]:
    def send(image: str, extra: dict[str, Any]) -> str:
        return app.send_task("tilerec.recognize", args=[image, RECOGNIZER], kwargs={**options, **extra}).id

    return send


def _check(metas: dict[str, dict[str, Any]]) -> None:
    if failed := _failed(metas):
        raise RuntimeError(f"{len(failed)} jobs failed, e.g.: {failed[0]}")


def _big_job(client: Any, send: Any, image: Path, processes: int, profile: Profile) -> dict[str, Any]:
    submitted = time.time()
    job_id = send(str(image), {})
    meta = wait_all(client, [job_id], profile.timeout_s)[job_id]
    _check({job_id: meta})
    wall = _date_done(meta) - submitted
    result = meta["result"]
    tiles = result["tiling"]["tiles"]
    if len(result["detections"]) != tiles:  # one box per tile, none overlapping: every tile counted once
        raise RuntimeError(f"{len(result['detections'])} detections for {tiles} tiles")
    ideal = tiles * profile.tile_ms / 1000 / processes
    return {"submitted": submitted, "tiles": tiles, "batches": result["tiling"]["batches"], "wall_s": wall,
            "ideal_s": ideal, "efficiency": ideal / wall, "merge_s": result["timings"]["merge_s"]}  # fmt: skip


def where_time_went(
    logs: Sequence[str], offsets: Sequence[int], big: dict[str, Any], processes: int, tile_ms: float
) -> dict[str, float]:
    """The big job's process-seconds (processes × its wall time) not spent on tile work, as shares of them: idle
    before a process's first batch (the tiling task plans and publishes), between its batches (Celery hands over
    the next one), inside batches beyond the recognizer (tilerec's reads, records and checks, Celery's result and
    chord writes), and after its last batch (the others still run, then the merge), from the nodes' log lines."""
    from bench.analysis import idle_time
    from bench.cluster import parse_log

    spans = []
    for node, (log, offset) in enumerate(zip(logs, offsets, strict=True)):
        with open(log, "rb") as text:
            text.seek(offset)
            found = parse_log(text.read().decode("utf-8", "replace"))
        spans += [(f"{node}/{s.process}", s.start, s.end) for s in found
                  if s.task == "tilerec.recognize_tiles" and s.start is not None and s.end is not None]  # fmt: skip
    if not spans:
        return {}
    total = processes * big["wall_s"]
    idle = idle_time(spans)
    first, last = min(start for _, start, _ in spans), max(end for _, _, end in spans)
    busy = sum(end - start for _, start, end in spans)
    unused = processes - idle["tile_processes"]  # processes that got no batch at all
    done = big["submitted"] + big["wall_s"]
    return {
        "lead": (idle["idle_lead"] + idle["tile_processes"] * (first - big["submitted"])) / total,
        "between": idle["idle_between"] / total,
        "in_batch": (busy - big["tiles"] * tile_ms / 1000) / total,
        "tail": (idle["idle_tail"] + idle["tile_processes"] * (done - last)) / total,
        "unused_processes": unused * big["wall_s"] / total,
    }


def _small_jobs(client: Any, send: Any, image: Path, processes: int, profile: Profile) -> dict[str, Any]:
    submitted, ids = {}, []
    began = time.time()
    for _ in range(profile.jobs):
        submitted[job_id := send(str(image), {})] = time.time()
        ids.append(job_id)
    metas = wait_all(client, ids, profile.timeout_s)
    _check(metas)
    ends = {job_id: _date_done(meta) for job_id, meta in metas.items()}
    latencies = [ends[job_id] - submitted[job_id] for job_id in ids]
    wall = max(ends.values()) - began
    return {"jobs": profile.jobs, "wall_s": wall, "jobs_per_s": profile.jobs / wall,
            "ideal_jobs_per_s": processes / (profile.tile_ms / 1000), "send_s": max(submitted.values()) - began,
            "latency_p50_s": percentile(latencies, 50), "latency_p99_s": percentile(latencies, 99)}  # fmt: skip


def _latency(client: Any, send: Any, image: Path, profile: Profile) -> dict[str, Any]:
    latencies = []
    for _ in range(profile.latency_jobs):
        submitted = time.time()
        job_id = send(str(image), {})
        meta = wait_all(client, [job_id], 60, poll_s=0.002)[job_id]
        _check({job_id: meta})
        latencies.append(_date_done(meta) - submitted)
    overhead = [1000 * (seconds - profile.tile_ms / 1000) for seconds in latencies]
    return {"jobs": profile.jobs, "p50_s": percentile(latencies, 50), "p99_s": percentile(latencies, 99),
            "overhead_p50_ms": percentile(overhead, 50), "overhead_p99_ms": percentile(overhead, 99)}  # fmt: skip


# --- the merge of a big job -----------------------------------------------------------------------------------


def synthetic_records(detections: int, tile: int = 640, overlap: float = 0.2, seed: int = 0) -> dict[int, str]:
    """Tile records (JSON by tile index, as tile tasks store them) of a square grid of 640² tiles holding about
    `detections` detections: objects scattered over the image, each reported by every tile that holds it whole,
    so those in the overlaps come two to four times, as the merge sees them."""
    from pipeline.inference import TileOutcome
    from pipeline.tiling import grid

    per_tile = 100
    tiles = max(1, round(detections / per_tile / 1.5))  # an object lies whole in about 1.5 tiles at 20 % overlap
    stride = round(tile * (1 - overlap))
    side_tiles = math.ceil(math.sqrt(tiles))
    side = stride * (side_tiles - 1) + tile
    windows = grid(side, side, tile, overlap)
    rng = np.random.default_rng(seed)
    sides = (8, 48)
    # an object of side w lies whole in (tile - w) / stride tiles along each axis, on average
    objects = round(detections / ((tile - sum(sides) / 2) / stride) ** 2)
    size = rng.uniform(*sides, (objects, 2))
    corner = rng.uniform(0, 1, (objects, 2)) * (side - size)
    boxes = np.hstack([corner, corner + size])
    owners: dict[int, list[np.ndarray]] = {}
    by_x = {w.x for w in windows}
    by_y = {w.y for w in windows}
    columns = {x: np.flatnonzero((boxes[:, 0] >= x) & (boxes[:, 2] <= x + tile)) for x in sorted(by_x)}
    rows = {y: np.flatnonzero((boxes[:, 1] >= y) & (boxes[:, 3] <= y + tile)) for y in sorted(by_y)}
    for window in windows:
        owners[window.index] = [np.intersect1d(columns[window.x], rows[window.y], assume_unique=True)]
    records = {}
    for window in windows:
        found = boxes[owners[window.index][0]]
        noisy = found + rng.normal(0, 0.5, found.shape)  # two tiles' views of an object differ a little
        detected = Detections(noisy, rng.uniform(0.5, 1.0, len(found)), ["object"] * len(found))
        records[window.index] = json.dumps(TileOutcome(window.index, detected, seconds=0.2).to_json())
    return records


def _merge_in_child(url: str, job_id: str, side: int, tiles: int, queue: Any) -> None:
    """The merge task's work on the stored records (read, decode, assemble), timed, in a fresh process."""
    from pipeline.inference import TileOutcome, assemble, windows_of
    from pipeline.options import parse_options
    from tasks import store
    from tasks.local import RedisServer  # noqa: F401  (imports tilerec's modules before the baseline is read)

    client = store.connect(url)
    options = parse_options("faces", {"tile": 640, "overlap": 0.2})
    windows = windows_of(side, side, options)
    base = vm_hwm_mb(os.getpid()) or 0.0
    began = time.perf_counter()
    records = store.get_records(client, job_id)
    read = time.perf_counter()
    outcomes = [TileOutcome.from_json(record) for record in records]
    decoded = time.perf_counter()
    recognition = assemble(outcomes, windows, options, side, side, time.time())
    merged = time.perf_counter()
    peak = vm_hwm_mb(os.getpid()) or 0.0
    queue.put({"read_s": read - began, "decode_s": decoded - read, "assemble_s": merged - decoded,
               "total_s": merged - began, "detections_in": sum(len(o.detections) for o in outcomes),
               "detections_out": len(recognition.detections), "tiles": tiles,
               "peak_rss_mb": peak, "rss_growth_mb": peak - base})  # fmt: skip


def merge_cost(detections: int) -> dict[str, Any]:
    """Time and memory of merging `detections` synthetic detections as the merge task does, in a fresh process;
    and the bytes their records take in Redis."""
    from tasks import store
    from tasks.local import RedisServer

    records = synthetic_records(detections)
    side = math.isqrt(len(records))
    side_px = round(640 * 0.8) * (side - 1) + 640
    with RedisServer() as server:
        client = server.client()
        empty = int(client.info("memory")["used_memory"])
        job_id = "scale-merge"
        client.set(store.job_key(job_id, "job"), "{}")
        items = list(records.items())
        for start in range(0, len(items), 500):
            store.put_records(client, job_id, dict(items[start : start + 500]), 3600)
        stored = int(client.info("memory")["used_memory"]) - empty
        context = multiprocessing.get_context("spawn")
        queue = context.Queue()
        child = context.Process(target=_merge_in_child, args=(server.url, job_id, side_px, len(records), queue))
        child.start()
        out = queue.get(timeout=1800)
        child.join()
    out["redis_mb"] = stored / 2**20
    out["record_bytes"] = sum(len(text) for text in records.values())
    return out


# --- the run --------------------------------------------------------------------------------------------------


def summary_line(row: dict[str, Any]) -> str:
    big, small, latency = row["big_job"], row["small_jobs"], row["latency"]
    share, lost = big["usage"]["core_share"], big.get("lost", {})
    return " ".join([
        f"{Path(row['tree']).name}: P={row['processes']:<3} nodes={len(row['nodes'])}",
        f"efficiency={big['efficiency']:.3f} (big job {big['tiles']} tiles in {big['batches']} batches:",
        f"{big['wall_s']:.1f} s, ideal {big['ideal_s']:.1f} s; lost:",
        " ".join(f"{name} {value:.3f}" for name, value in lost.items()) + ")",
        f" small jobs {small['jobs_per_s']:.1f}/s (ideal {small['ideal_jobs_per_s']:.0f},",
        f"p50 {small['latency_p50_s']:.2f} s, p99 {small['latency_p99_s']:.2f} s)",
        f" one job alone: p50 {latency['p50_s'] * 1000:.0f} ms",
        f" cores used: redis {share['redis']:.2f} celery {share['celery_consumers']:.2f}",
        f"tasks {share['task_processes']:.2f} others {share['others']:.2f}  load {row['load_average'][0]:.1f}",
    ])  # fmt: skip


def plot(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Efficiency of the big job and jobs/s of the small ones against processes, with the cores' shares."""
    from bench import plots

    if not plots.available() or not rows:
        return None
    rows = sorted(rows, key=lambda row: row["processes"])
    plt = plots._pyplot()
    processes = [row["processes"] for row in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(processes, [row["big_job"]["efficiency"] for row in rows], "o-", label="efficiency (ideal / measured)")
    for role in ("redis", "celery_consumers", "task_processes", "others"):
        shares = [row["big_job"]["usage"]["core_share"][role] for row in rows]
        left.plot(processes, shares, ".--", label=f"cores used: {role.replace('_', ' ')}")
    left.axhline(0.9, color="grey", lw=0.8)
    left.set(xscale="log", xlabel="worker processes", ylabel="efficiency / share of the 2 cores", ylim=(0, 1.05),
             title=f"one {rows[0]['big_job']['tiles']}-tile job, 200 ms a tile")  # fmt: skip
    left.set_xticks(processes, [str(p) for p in processes])
    left.legend(fontsize=7)
    right.plot(processes, [row["small_jobs"]["jobs_per_s"] for row in rows], "o-", label="measured")
    right.plot(processes, [row["small_jobs"]["ideal_jobs_per_s"] for row in rows], "--", color="grey", label="ideal")
    right.set(xscale="log", xlabel="worker processes", ylabel="jobs/s", ylim=(0, None),
              title=f"{rows[0]['small_jobs']['jobs']} one-tile jobs at once")  # fmt: skip
    right.set_xticks(processes, [str(p) for p in processes])
    for axes in (left, right):
        axes.xaxis.set_minor_locator(plt.NullLocator())
    right.legend(fontsize=7)
    fig.tight_layout()
    return plots._save(fig, path)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 1,000-tile job and 200 small jobs: a few minutes")
    parser.add_argument("--processes", help="comma list of worker process counts (default 2,8,32,64)")
    parser.add_argument("--tiles", type=int, help="tiles of the big job (default 10,000)")
    parser.add_argument("--jobs", type=int, help="small one-tile jobs (default 1,000)")
    parser.add_argument("--tile-ms", type=float, help="the sleep of a tile (default 200 ms)")
    parser.add_argument("--latency-jobs", type=int, help="one-tile jobs sent one at a time (default 50)")
    parser.add_argument("--detections", type=int, help="detections merged (default 1,000,000; 0: skip)")
    parser.add_argument("--per-node", type=int, help="worker processes per node (default 8)")
    parser.add_argument("--vs", type=Path, metavar="TREE", help="another checkout of tilerec, run before this one at "
                        "each size, side by side (e.g. a `git worktree` of the commit before a change)")  # fmt: skip
    parser.add_argument("--out", type=Path, help="folder of results.json, scaling.png, worker logs")
    parser.add_argument("--replot", type=Path, nargs="+", metavar="JSON",
                        help="only draw scaling.png from earlier results.json files (this tree's rows; the last "
                        "of each size counts)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.replot:
        rows = {row["processes"]: row for path in args.replot for row in json.loads(path.read_text())["sizes"]
                if row["tree"] == str(REPO)}  # fmt: skip
        out = args.out or args.replot[-1].parent
        out.mkdir(parents=True, exist_ok=True)
        print(f"plot: {plot(list(rows.values()), out / 'scaling.png')}")
        return {"sizes": list(rows.values())}
    profile = QUICK if args.quick else Profile()
    processes = tuple(int(p) for p in args.processes.split(",")) if args.processes else None
    changes = {"processes": processes, "tiles": args.tiles, "jobs": args.jobs, "detections": args.detections,
               "per_node": args.per_node, "tile_ms": args.tile_ms, "latency_jobs": args.latency_jobs}  # fmt: skip
    profile = Profile(**{**asdict(profile), **{key: value for key, value in changes.items() if value is not None}})
    out = args.out or Path("bench-out") / ("scale-quick" if args.quick else "scale")
    out.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    results: dict[str, Any] = {"profile": asdict(profile), "cores": cores, "load_average_start": os.getloadavg(),
                               "command": "python -m bench.scale " + " ".join(argv or [])}  # fmt: skip
    rows = results.setdefault("sizes", [])
    with tempfile.TemporaryDirectory(prefix="tilerec-scale-") as folder:
        images = (Path(folder) / "big.tif", Path(folder) / "small.tif")
        write_image(images[0], profile.tiles)
        write_image(images[1], 1, seed=1)
        for processes in profile.processes:
            for tree in ([args.vs.resolve()] if args.vs else []) + [REPO]:
                rows.append(run_size(processes, profile, Path(folder), images, cores, tree))
                print(summary_line(rows[-1]), flush=True)
                (out / "results.json").write_text(json.dumps(results, indent=1))
    if profile.detections:
        results["merge"] = merge_cost(profile.detections)
        merge = results["merge"]
        print(f"merge of {merge['detections_in']} detections ({merge['tiles']} tiles): {merge['total_s']:.2f} s "
              f"(read {merge['read_s']:.2f}, decode {merge['decode_s']:.2f}, assemble {merge['assemble_s']:.2f}), "
              f"peak {merge['peak_rss_mb']:.0f} MB (+{merge['rss_growth_mb']:.0f}), in Redis "
              f"{merge['redis_mb']:.0f} MB", flush=True)  # fmt: skip
    results["load_average_end"] = os.getloadavg()
    (out / "results.json").write_text(json.dumps(results, indent=1))
    if figure := plot([row for row in rows if row["tree"] == str(REPO)], out / "scaling.png"):
        print(f"plot: {figure}")
    return results


if __name__ == "__main__":
    main()
