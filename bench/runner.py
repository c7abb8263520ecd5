"""The benchmark's phases, run in one process that drives real clusters and fresh in-process interpreters.

Every measurement becomes a plain dict in `results["runs"]` (or its phase's section), so analysis and the report
work from the JSON alone and a rerun's figures can be compared line by line.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from bench import anatomy, storage
from bench.cluster import Cluster, JobRun, stages, timeline
from bench.config import Profile, cores
from bench.inprocess import run_in_subprocess, run_together
from bench.scenes import CODE_KIND, PHOTO_KINDS, SceneFile, one_tile_image, scene_file
from pipeline.model import Detections
from pipeline.scenes.codes import Truth, placement_of, score

# OpenCV's barcode box spans the middle rows of the bars only (IoU 0.4-0.7 with the full bars); the decoded digits
# identify the code, so a lower box threshold still matches nothing but the right code.
MIN_IOU = {"barcode": 0.3}


@dataclass
class Bench:
    """What the phases share: the profile, the folders, the worker environment and the collected results."""

    profile: Profile
    out: Path
    console: Console
    recognizers: list[str]
    env: dict[str, str]
    results: dict[str, Any] = field(default_factory=dict)
    clusters: dict[int, Cluster] = field(default_factory=dict)
    warmed: set[tuple[int, str]] = field(default_factory=set)

    @property
    def scenes_dir(self) -> Path:
        return self.out / "scenes"

    @property
    def max_workers(self) -> int:
        return max(self.profile.workers)

    def options(self, **extra: Any) -> dict[str, Any]:
        return {"tile": self.profile.tile, "overlap": self.profile.overlap, **extra}


def machine() -> dict[str, Any]:
    """The machine and software the figures come from, and how busy the machine was (load average)."""
    model = ""
    with open("/proc/cpuinfo") as info:
        model = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "")
    memory_kb = next(
        (
            int(line.split()[1])
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal")
        ),
        0,
    )
    versions: dict[str, str] = {"python": platform.python_version(), "opencv": cv2.__version__, "numpy": np.__version__}
    for package in ("celery", "redis", "onnxruntime"):
        try:
            versions[package] = __import__(package).__version__
        except ImportError:
            versions[package] = "not installed"
    try:
        from tasks.local import find_redis_server

        server = subprocess.run([find_redis_server(), "--version"], capture_output=True, text=True, timeout=10)
        versions["redis-server"] = server.stdout.split("v=")[1].split()[0] if "v=" in server.stdout else "?"
    except (RuntimeError, OSError, IndexError, subprocess.SubprocessError):
        versions["redis-server"] = "?"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=_repo())
    dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, cwd=_repo())
    return {
        "cpu": model,
        "cores": cores(),
        "memory_gb": round(memory_kb / 2**20, 1),
        "kernel": platform.release(),
        "versions": versions,
        "git": commit.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else ""),
        "load_average_start": os.getloadavg(),
        "cpu_capacity_start": cpu_capacity(cores()),
        "code_start": code_fingerprint(),
    }


def _burn(loops: int) -> float:
    began = time.perf_counter()
    total = 0
    for i in range(loops):
        total += i * i
    return time.perf_counter() - began


def cpu_capacity(processes: int, loops: int = 3_000_000) -> float:
    """How many cores the machine gives right now: N busy processes against one alone (N = cores is ideal).

    Other people's work on the machine shows up here first; a figure well below the core count means the speed
    ratios of this run understate what W processes would get on a quiet machine.
    """
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    with ProcessPoolExecutor(processes, mp_context=get_context("spawn")) as pool:
        list(pool.map(_burn, [10_000] * processes))  # start the processes first
        alone = min(pool.submit(_burn, loops).result() for _ in range(2))
        began = time.perf_counter()
        list(pool.map(_burn, [loops] * processes))
        together = time.perf_counter() - began
    return processes * alone / together


def code_fingerprint() -> str:
    """A hash of tilerec's code (tasks, pipeline, celeryconfig): equal at the start and end of a run, or the run
    measured more than one version (workers started later import the newer code)."""
    digest_ = hashlib.sha256()
    files = sorted(
        [*(_repo() / "tasks").glob("*.py"), *(_repo() / "pipeline").rglob("*.py"), _repo() / "celeryconfig.py"]
    )
    for path in files:
        digest_.update(str(path.relative_to(_repo())).encode())
        digest_.update(path.read_bytes())
    return digest_.hexdigest()[:12]


def _repo() -> Path:
    return Path(__file__).resolve().parents[1]


def digest(records: list[dict[str, Any]] | None) -> str | None:
    """A short fingerprint of a detection list, to compare runs without storing every detection."""
    if records is None:
        return None
    return hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()[:16]


def scored(records: list[dict[str, Any]], truths: list[Truth], recognizer: str, size: int, profile: Profile) -> dict:
    """Recall, precision, duplicates and mean IoU against the truths, plus recall by where objects lie."""
    detections = Detections.from_records(records)
    min_iou = MIN_IOU.get(recognizer, 0.5)
    total = score(detections, truths, min_iou)
    by_place: dict[str, Any] = {}
    for where in ("inside", "seam", "edge"):
        subset = [t for t in truths if placement_of(t, size, size, profile.tile, profile.overlap) == where]
        if subset:
            by_place[where] = {"truths": len(subset), "recall": score(detections, subset, min_iou).recall}
    return {
        "truths": total.truths,
        "detections": total.detections,
        "found": total.found,
        "recall": total.recall,
        "precision": total.precision,
        "duplicates": total.duplicates,
        "false_positives": total.false_positives,
        "mean_iou": total.mean_iou,
        "min_iou": min_iou,
        "by_placement": by_place,
    }


class Runner:
    """Drives the phases; each phase appends plain dicts to `bench.results`."""

    def __init__(self, bench: Bench, progress: Progress) -> None:
        self.bench = bench
        self.progress = progress
        self.task = progress.add_task("benchmark", total=None)
        self.runs: list[dict[str, Any]] = bench.results.setdefault("runs", [])

    def step(self, what: str) -> None:
        self.progress.update(self.task, description=what)

    def advance(self) -> None:
        self.progress.advance(self.task)

    # --- in-process -------------------------------------------------------------------------------------------

    def in_process(
        self,
        scene: SceneFile,
        recognizer: str,
        mode: str,
        threads: str | int,
        reps: int,
        phase: str,
        timeout: float | None = None,
        whatif: str | None = None,
    ) -> list[dict[str, Any]]:
        """One fresh interpreter per call; one run record per timed pass."""
        profile = self.bench.profile
        variant = "whole" if mode == "whole" else f"inproc-{threads}"
        self.step(f"{scene.name} {recognizer}: {variant}")
        spec = {
            "image": str(scene.path),
            "recognizer": recognizer,
            "mode": mode,
            "threads": threads,
            "reps": reps,
            "options": self.bench.options(),
        }
        out = run_in_subprocess(spec, timeout or profile.job_timeout_s * max(1, reps))
        base = {
            "phase": phase,
            "scene": scene.name,
            "input": input_format(scene.path),
            "kind": scene.kind,
            "size": scene.size,
            "recognizer": recognizer,
            "variant": variant,
            "mode": 1 if mode == "whole" else 2,
            "threads": threads,
            "workers": None,
            "whatif": whatif,
        }
        self.advance()
        if "error" in out:
            record = {**base, "rep": 0, "error": out["error"], "timed_out": out.get("timed_out", False)}
            self.runs.append(record)
            return [record]
        records = []
        for rep, timing in enumerate(out["passes"]):
            record = {
                **base,
                "rep": rep,
                "wall_s": timing["total_s"],
                "timings": timing,
                "tiles": timing["tiles"],
                "peak_rss_mb": out["peak_rss_mb"],
                "opencv_threads": out["opencv_threads"],
                "detections_digest": digest(out["detections"]),
                "reps_identical": out["reps_identical"],
            }
            if rep == 0:
                record["score"] = scored(
                    out["detections"], scene.truths_for(recognizer), recognizer, scene.size, profile
                )
            records.append(record)
        self.runs.extend(records)
        return records

    # --- distributed ------------------------------------------------------------------------------------------

    def cluster(self, workers: int) -> Cluster:
        return self.bench.clusters[workers]

    def warm(self, workers: int, recognizer: str, image: Path) -> None:
        if (workers, recognizer) in self.bench.warmed:
            return
        self.step(f"warming W={workers} for {recognizer}")
        self.cluster(workers).warm(str(image), recognizer, self.bench.options(), self.bench.profile.job_timeout_s)
        self.bench.warmed.add((workers, recognizer))

    def ceiling(self, scene: SceneFile, recognizer: str, workers: int, rep: int) -> dict[str, Any]:
        """The recognition stage with `workers` one-thread processes, a perfect split and no Celery: what the
        hardware allows W processes here, for tilerec's recognition efficiency to be read against."""
        self.step(f"{scene.name} {recognizer}: ceiling W={workers}")
        spec = {"image": str(scene.path), "recognizer": recognizer, "options": self.bench.options()}
        out = run_together(spec, workers, self.bench.profile.job_timeout_s)
        record: dict[str, Any] = {
            "phase": "ceiling",
            "scene": scene.name,
            "input": input_format(scene.path),
            "recognizer": recognizer,
            "variant": f"ceiling-W{workers}",
            "workers": workers,
            "threads": 1,
            "rep": rep,
        }
        self.advance()
        if "error" in out:
            record["error"] = out["error"]
        else:
            record.update(wall_s=out["recognize_s"], timings=out, tiles=out["tiles"])
        self.runs.append(record)
        return record

    def distributed(
        self,
        scene: SceneFile | Path,
        recognizer: str,
        workers: int,
        phase: str,
        rep: int = 0,
        batch_size: int | str | None = None,
        score_it: bool = True,
        cluster: Cluster | None = None,
        whatif: str | None = None,
    ) -> dict[str, Any]:
        """One job on the cluster with `workers` processes (or on `cluster`); its record carries the stages and
        the timeline."""
        path = scene.path if isinstance(scene, SceneFile) else scene
        name = scene.name if isinstance(scene, SceneFile) else path.stem
        options = self.bench.options(**({} if batch_size is None else {"batch_size": batch_size}))
        self.step(f"{name} {recognizer}: W={workers}" + ("" if batch_size is None else f" batch {batch_size}"))
        job: JobRun = (cluster or self.cluster(workers)).run(
            str(path), recognizer, options, self.bench.profile.job_timeout_s
        )
        record: dict[str, Any] = {
            "phase": phase,
            "scene": name,
            "input": input_format(path),
            "kind": getattr(scene, "kind", None),
            "size": getattr(scene, "size", None),
            "recognizer": recognizer,
            "variant": f"dist-W{workers}",
            "mode": 3,
            "threads": max(1, cores() // workers),
            "workers": workers,
            "batch_size": batch_size if batch_size is not None else "auto",
            "rep": rep,
            "wall_s": job.wall_s,
            "whatif": whatif,
        }
        self.advance()
        if job.error or job.result is None:
            record["error"] = job.error or "no result"
            self.runs.append(record)
            return record
        result = job.result
        record.update(
            timings=result["timings"],
            tiles=result["tiling"]["tiles"],
            batches=result["tiling"]["batches"],
            tasks=result["tiling"]["tasks"],
            failed_tiles=len(result["failed_tiles"]),
            stages=stages(job),
            timeline=timeline(job),
            detections_digest=digest(result["detections"]),
        )
        if score_it and isinstance(scene, SceneFile):
            record["score"] = scored(
                result["detections"], scene.truths_for(recognizer), recognizer, scene.size, self.bench.profile
            )
        self.runs.append(record)
        return record


# --- phases ---------------------------------------------------------------------------------------------------


def build_scenes(runner: Runner) -> list[SceneFile]:
    """Code scenes at every accuracy size (and the speed and memory sizes); photo scenes when the DNNs exist."""
    bench, profile = runner.bench, runner.bench.profile
    wanted: list[tuple[str, int]] = []
    code_sizes = sorted(set(profile.accuracy_sizes) | {profile.speed_size} | set(profile.memory_sizes))
    if {"qrcode", "aruco", "barcode"} & set(bench.recognizers):
        wanted += [(CODE_KIND, size) for size in code_sizes]
    for kind, recognizers in PHOTO_KINDS.items():
        if set(recognizers) & set(bench.recognizers):
            sizes = sorted(set(profile.photo_sizes) | ({profile.speed_size} if profile.photo_sizes else set()))
            wanted += [(kind, size) for size in sizes]
    scenes = []
    for kind, size in wanted:
        runner.step(f"scene {kind} {size}²")
        began = time.perf_counter()
        found = scene_file(
            bench.scenes_dir, kind, size, profile.seed, profile.per_megapixel, profile.tile, profile.overlap
        )
        if found is None:
            bench.console.log(
                f"[yellow]no {kind} scene: pipeline.scenes.photos or ../shared/images/astronaut.png missing"
            )
            continue
        bench.console.log(f"scene {found.name}: {len(found.truths)} objects ({time.perf_counter() - began:.1f} s)")
        scenes.append(found)
    return scenes


def _whole_allowed(runner: Runner, scene: SceneFile, recognizer: str) -> str | None:
    """None if the whole-image pass should run, else why not (too big, or the last size nearly timed out)."""
    profile = runner.bench.profile
    if scene.pixels > profile.whole_max_pixels:
        return f"not run: above the whole-image limit of {profile.whole_max_pixels / 1e6:.0f} MP"
    for run in runner.runs:
        if run["recognizer"] != recognizer or run["variant"] != "whole" or run.get("kind") != scene.kind:
            continue
        if run["size"] < scene.size:
            if run.get("timed_out"):
                return "not run: timed out on a smaller image"
            predicted = run.get("wall_s", 0) * scene.pixels / (run["size"] ** 2)
            if predicted > profile.whole_timeout_s:
                return f"not run: predicted {predicted:.0f} s from the {run['size']}² pass"
    return None


def accuracy_and_speed(runner: Runner, scenes: list[SceneFile]) -> None:
    """Per scene and recognizer: whole-image, tiled in-process and distributed; at the speed size, every variant
    side by side, `reps` times, interleaved so drifting machine load hits all variants alike."""
    bench, profile = runner.bench, runner.bench.profile
    warm_image = next((s.path for s in scenes if s.size == min(x.size for x in scenes)), None)
    matching_threads = max(1, cores() // bench.max_workers)
    for scene in scenes:
        for recognizer in [r for r in scene.recognizers if r in bench.recognizers]:
            for workers in profile.workers:
                runner.warm(workers, recognizer, warm_image or scene.path)
            skipped = _whole_allowed(runner, scene, recognizer)
            if skipped:
                runner.runs.append(
                    {
                        "phase": "accuracy",
                        "scene": scene.name,
                        "kind": scene.kind,
                        "size": scene.size,
                        "recognizer": recognizer,
                        "variant": "whole",
                        "mode": 1,
                        "skipped": skipped,
                    }
                )
            else:
                runner.in_process(scene, recognizer, "whole", "default", 1, "accuracy", profile.whole_timeout_s)
            if scene.size == profile.speed_size:
                # the same pixels as PNG (decoded whole, serially, in both modes) and as a tiled TIFF (read window
                # by window: in process, and by tilerec's tile tasks themselves)
                inputs = [scene, *[tiff for tiff in (_as_tiled_tiff(scene),) if tiff is not None]]
                for rep in range(profile.reps):
                    for source in inputs:
                        runner.in_process(source, recognizer, "tiled", "default", 1, "speed")
                        runner.in_process(source, recognizer, "tiled", 1, 1, "speed")
                        for workers in profile.workers:
                            runner.distributed(source, recognizer, workers, "speed", rep)
                            if workers > 1:
                                runner.ceiling(source, recognizer, workers, rep)
            else:
                runner.in_process(scene, recognizer, "tiled", matching_threads, 1, "accuracy")
                runner.distributed(scene, recognizer, bench.max_workers, "accuracy")


def batch_curve(runner: Runner, scenes: list[SceneFile]) -> None:
    """Tiles per batch against efficiency: each batch size at every W, on the speed-size scene."""
    bench, profile = runner.bench, runner.bench.profile
    for recognizer in [r for r in profile.batch_recognizers if r in bench.recognizers]:
        scene = next((s for s in scenes if s.size == profile.speed_size and recognizer in s.recognizers), None)
        if scene is None:
            continue
        for batch_size in profile.batch_sizes:
            for workers in profile.workers:
                runner.distributed(scene, recognizer, workers, "batch", batch_size=batch_size, score_it=False)


WHATIF_CONFIGS: dict[str, dict[str, Any]] = {
    "no task-sent events": {"task_send_sent_event": False},
    "task events on (as while Flower watches)": {"worker_send_task_events": True},
}
INPUT_NPY = "input as .npy (no decode)"


def input_format(path: Path) -> str:
    return {".tif": "tiled TIFF", ".npy": ".npy"}.get(path.suffix, path.suffix.lstrip(".").upper())


def _as_tiled_tiff(scene: SceneFile) -> SceneFile | None:
    """The scene as an uncompressed tiled TIFF, which tilerec's tile tasks read window by window straight from the
    file (no whole decode, no tile store); None where this tilerec or tifffile cannot do that."""
    try:
        import tifffile

        from pipeline.inference import recognize_source  # noqa: F401  (the in-process reader of such files)
        from pipeline.readers.sources import open_source  # noqa: F401
    except ImportError:
        return None
    path = scene.path.with_suffix(".tif")
    if not path.is_file():
        rgb = cv2.cvtColor(cv2.imread(str(scene.path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        tifffile.imwrite(path, rgb, photometric="rgb", tile=(256, 256))
    return replace(scene, path=path)


ENCODINGS = {".jpg": [cv2.IMWRITE_JPEG_QUALITY, 95], ".webp": [cv2.IMWRITE_WEBP_QUALITY, 90]}


def _as_encoded(scene: SceneFile, suffix: str) -> SceneFile:
    """The scene as a JPEG (quality 95) or a WebP (quality 90): lossy, so its detections may differ from the PNG's,
    but every variant reads the same file."""
    path = scene.path.with_suffix(suffix)
    pixels = None if path.is_file() else cv2.imread(str(scene.path), cv2.IMREAD_UNCHANGED)
    if pixels is not None and not cv2.imwrite(str(path), pixels, ENCODINGS[suffix]):
        raise OSError(f"cannot write {path}")
    return replace(scene, path=path)


def _as_npy(scene: SceneFile) -> SceneFile:
    """The scene's pixels as a .npy file, which tilerec reads without a codec: the decode-free serial floor."""
    path = scene.path.with_suffix(".npy")
    if not path.is_file():
        np.save(path, cv2.imread(str(scene.path), cv2.IMREAD_UNCHANGED), allow_pickle=False)
    return replace(scene, path=path)


def what_if(runner: Runner, scenes: list[SceneFile]) -> None:
    """Changes that the numbers point at, measured side by side with today at the speed size and W = max:
    Celery settings (bench/whatif/celeryconfig.py on extra clusters) and an input that needs no decoding (the tiled
    TIFF, read window by window, is part of the speed phase)."""
    bench, profile = runner.bench, runner.bench.profile
    workers = bench.max_workers
    chosen = [r for r in profile.whatif_recognizers if r in bench.recognizers][:2]
    targets = []
    for recognizer in chosen:
        scene = next((s for s in scenes if s.size == profile.speed_size and recognizer in s.recognizers), None)
        if scene is not None:
            targets.append((recognizer, scene))
    if not targets:
        return
    with ExitStack() as stack:
        extra = {}
        for name, overrides in WHATIF_CONFIGS.items():
            runner.step(f"what-if cluster: {name}")
            extra[name] = stack.enter_context(Cluster(workers, bench.out, bench.env, overrides))
        for recognizer, scene in targets:
            npy = _as_npy(scene)
            for cluster in extra.values():
                cluster.warm(str(scene.path), recognizer, bench.options(), profile.job_timeout_s)
            for rep in range(profile.reps):
                runner.distributed(scene, recognizer, workers, "whatif", rep, score_it=False, whatif="today")
                for name, cluster in extra.items():
                    runner.distributed(scene, recognizer, workers, "whatif", rep, score_it=False, cluster=cluster,
                                       whatif=name)  # fmt: skip
                runner.distributed(npy, recognizer, workers, "whatif", rep, score_it=False, whatif=INPUT_NPY)
                runner.in_process(npy, recognizer, "tiled", 1, 1, "whatif", whatif=INPUT_NPY)
        image = one_tile_image(bench.scenes_dir, profile.seed)
        recognizer = targets[0][0]
        for name, cluster in extra.items():
            cluster.warm(str(image), recognizer, bench.options(), profile.job_timeout_s)
            for rep in range(profile.latency_reps):
                runner.distributed(image, recognizer, workers, "latency", rep, score_it=False, cluster=cluster,
                                   whatif=name)  # fmt: skip


def latency(runner: Runner) -> None:
    """A one-tile image through the whole chord at W = max: end-to-end minus the recognizer's own time."""
    bench, profile = runner.bench, runner.bench.profile
    recognizer = "aruco" if "aruco" in bench.recognizers else bench.recognizers[0]
    image = one_tile_image(bench.scenes_dir, profile.seed)
    runner.warm(bench.max_workers, recognizer, image)
    for rep in range(profile.latency_reps):
        runner.distributed(image, recognizer, bench.max_workers, "latency", rep, score_it=False)
    fake = SceneFile("one-tile", 640, image, [], (recognizer,))
    runner.in_process(fake, recognizer, "tiled", "default", profile.latency_reps, "latency")


def memory_and_messages(runner: Runner, scenes: list[SceneFile]) -> None:
    """The job dissected (anatomy.dissect) at each memory size, with the in-process peak RSS beside it."""
    bench, profile = runner.bench, runner.bench.profile
    recognizer = "aruco" if "aruco" in bench.recognizers else bench.recognizers[0]
    rows = bench.results.setdefault("anatomy", [])
    for size in profile.memory_sizes:
        scene = next((s for s in scenes if s.size == size and s.kind == CODE_KIND), None)
        if scene is None:
            continue
        runner.step(f"memory and messages {size}²")
        try:
            row = anatomy.dissect(
                scene.path, recognizer, bench.options(), bench.max_workers, bench.env, bench.out, profile.job_timeout_s
            )
        except (TimeoutError, RuntimeError) as error:
            row = {"image": scene.path.name, "error": str(error)}
        row["size"] = size
        in_process = runner.in_process(scene, recognizer, "tiled", "default", 1, "memory")
        row["in_process_peak_mb"] = in_process[0].get("peak_rss_mb")
        rows.append(row)
        runner.advance()


def tile_storage(runner: Runner, scenes: list[SceneFile]) -> None:
    """Codecs for tiles, input formats for the serial decode, and put_tiles/delete_job on the speed scene."""
    bench, profile = runner.bench, runner.bench.profile
    scene = next((s for s in scenes if s.size == profile.speed_size and s.kind == CODE_KIND), scenes[0])
    runner.step(f"tile storage on {scene.name}")
    image = cv2.imread(str(scene.path), cv2.IMREAD_UNCHANGED)
    from pipeline.tiling import grid
    from tasks.local import RedisServer

    windows = grid(image.shape[0], image.shape[1], profile.tile, profile.overlap)
    sample = [np.ascontiguousarray(image[w.y : w.y2, w.x : w.x2]) for w in windows[:: max(1, len(windows) // 8)][:8]]
    with RedisServer() as server:
        client = server.client()
        bench.results["storage"] = {
            "scene": scene.name,
            "tile_shape": list(sample[0].shape),
            "codecs": storage.tile_codecs(client, sample),
            "transports": storage.transports(client, sample, bench.out),
            "store": storage.store_and_cleanup(client, image, profile.tile, profile.overlap),
            "inputs": storage.input_formats(image),
        }
    runner.advance()


@contextmanager
def clusters(bench: Bench) -> Iterator[None]:
    """One cluster per W, alive side by side (idle workers cost nothing), so variants can be interleaved."""
    with ExitStack() as stack:
        for workers in bench.profile.workers:
            bench.console.log(f"starting a cluster with W={workers} worker processes")
            bench.clusters[workers] = stack.enter_context(Cluster(workers, bench.out, bench.env))
        try:
            yield
        finally:
            bench.clusters.clear()


def run(bench: Bench) -> dict[str, Any]:
    """All phases; returns the raw results (analysis and report come after)."""
    started = time.time()
    bench.results.update(machine=machine(), profile=bench.profile.to_json(), recognizers=bench.recognizers)
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=bench.console, transient=False) as progress:
        runner = Runner(bench, progress)
        scenes = build_scenes(runner)
        bench.results["scenes"] = [
            {
                "name": s.name,
                "kind": s.kind,
                "size": s.size,
                "objects": len(s.truths),
                "path": str(s.path),
                "placements": _placements(s, bench.profile),
            }
            for s in scenes
        ]
        with clusters(bench):
            accuracy_and_speed(runner, [s for s in scenes if s.size in _scored_sizes(bench.profile, s)])
            batch_curve(runner, scenes)
            latency(runner)
            what_if(runner, scenes)
        memory_and_messages(runner, scenes)
        tile_storage(runner, scenes)
        runner.step("done")
    bench.results["machine"]["load_average_end"] = os.getloadavg()
    bench.results["machine"]["cpu_capacity_end"] = cpu_capacity(cores())
    bench.results["machine"]["code_end"] = code_fingerprint()
    bench.results["duration_s"] = time.time() - started
    return bench.results


def _scored_sizes(profile: Profile, scene: SceneFile) -> set[int]:
    if scene.kind == CODE_KIND:
        return set(profile.accuracy_sizes) | {profile.speed_size}
    return set(profile.photo_sizes) | ({profile.speed_size} if profile.photo_sizes else set())


def _placements(scene: SceneFile, profile: Profile) -> dict[str, int]:
    counts: dict[str, int] = {}
    for truth in scene.truths:
        where = placement_of(truth, scene.size, scene.size, profile.tile, profile.overlap)
        counts[where] = counts.get(where, 0) + 1
    return counts
