"""Figures derived from the raw runs: accuracy per mode, speed ratios, stage shares, overhead, targets.

Medians over repetitions everywhere (one slow outlier from a busy machine should not move a ratio); every ratio is
between runs made side by side in the same benchmark run.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from itertools import pairwise
from typing import Any

STAGES = (
    "queue_in",
    "read_decode",
    "store",
    "dispatch",
    "to_first_tile",
    "recognition",
    "gather",
    "merge",
    "deliver",
)
IN_PROCESS_STAGES = ("read_s", "decode_s", "recognize_s", "merge_s")


def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _ok(run: dict[str, Any]) -> bool:
    return "error" not in run and "skipped" not in run


def accuracy(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (scene, recognizer, mode): the first scored run of each, and whether tiled runs agree."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    digests: dict[tuple[str, str], dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for run in runs:
        if run.get("phase") not in ("accuracy", "speed") or run.get("input", "PNG") != "PNG":
            continue  # the speed phase's tiled TIFF holds the same pixels: scored once, from the PNG
        key = (run["scene"], run["recognizer"])
        row = rows.setdefault(
            key,
            {
                "scene": run["scene"],
                "kind": run["kind"],
                "size": run["size"],
                "recognizer": run["recognizer"],
                "modes": {},
            },
        )
        mode = {1: "whole", 2: "tiled", 3: "distributed"}[run["mode"]]
        if "skipped" in run or "error" in run:
            row["modes"].setdefault(mode, {"note": run.get("skipped") or run.get("error")})
        elif "score" in run and "score" not in row["modes"].get(mode, {}):
            row["modes"][mode] = {"score": run["score"], "variant": run["variant"], "wall_s": run["wall_s"]}
        if _ok(run) and run["mode"] in (2, 3):
            threads = run.get("opencv_threads") or run["threads"]  # "default" is the library's own count
            digests[key][f"{run['variant']}@{threads}"].add(run["detections_digest"])
    for key, row in rows.items():
        by_variant = digests[key]
        distributed = {v: d for v, d in by_variant.items() if v.startswith("dist")}
        in_process = {v: d for v, d in by_variant.items() if v.startswith("inproc")}
        all_inproc = set().union(*in_process.values()) if in_process else set()
        row["identical_2_3"] = (
            all(_matching_in_process(v, d, in_process, all_inproc) for v, d in distributed.items())
            if distributed and in_process
            else None  # one side failed or did not run: not measured (the failure is listed under errors)
        )
        row["tiled_digests"] = {v: sorted(d) for v, d in by_variant.items()}
        row["all_tiled_identical"] = len(set().union(*by_variant.values())) == 1 if by_variant else False
    return sorted(rows.values(), key=lambda r: (r["kind"], r["recognizer"], r["size"]))


def _matching_in_process(variant: str, digests: set[str], in_process: dict[str, set[str]], every: set[str]) -> bool:
    """A distributed run equals the in-process run with the same threads per process (thread counts may change a
    DNN's last float digits); with no such run, any in-process run."""
    threads = variant.split("@")[1]
    same = [d for v, d in in_process.items() if v.split("@")[1] == threads]
    reference = set().union(*same) if same else every
    return len(digests) == 1 and digests <= reference and len(reference) == 1


def _by(runs: list[dict[str, Any]], **match: Any) -> list[dict[str, Any]]:
    return [r for r in runs if _ok(r) and all(r.get(k) == v for k, v in match.items())]


def speed(runs: list[dict[str, Any]], workers: list[int]) -> list[dict[str, Any]]:
    """Per recognizer at the speed size: medians of each variant, speedups, efficiencies and the serial share."""
    rows = []
    speed_runs = [r for r in runs if r.get("phase") == "speed"]
    for recognizer, source in sorted({(r["recognizer"], r.get("input", "PNG")) for r in speed_runs}):
        sel = [r for r in speed_runs if r["recognizer"] == recognizer and r.get("input", "PNG") == source]
        default = _by(sel, variant="inproc-default")
        single = _by(sel, variant="inproc-1")
        if not default and not single:
            continue
        t_default = _median([r["wall_s"] for r in default])
        t_single = _median([r["wall_s"] for r in single])
        r_single = _median([r["timings"]["recognize_s"] for r in single])
        r_default = _median([r["timings"]["recognize_s"] for r in default])
        reference = (single or default)[0]
        row: dict[str, Any] = {
            "recognizer": recognizer,
            "input": source,
            "scene": reference["scene"],
            "size": reference["size"],
            "tiles": reference["tiles"],
            "inproc_default_s": t_default,
            "inproc_single_s": t_single,
            "inproc_default_recognize_s": r_default,
            "inproc_single_recognize_s": r_single,
            "inproc_default_cores_used": _median([r["timings"]["cpu_s"] / r["wall_s"] for r in default]),
            "inproc_decode_s": _median([r["timings"]["read_s"] + r["timings"]["decode_s"] for r in single + default]),
            "by_workers": {},
        }
        for w in workers:
            dist = _by(sel, variant=f"dist-W{w}")
            if not dist:
                continue
            wall = _median([r["wall_s"] for r in dist])
            staged = [r["stages"] for r in dist if r.get("stages")]
            rec_wall = _median([s["recognition"] for s in staged])
            serial = _median([s["queue_in"] + s["read_decode"] + s["store"] + s["dispatch"] for s in staged])
            entry = {
                "wall_s": wall,
                "batches": batches_of(dist[0]),
                "tasks": dist[0]["tasks"],
                "speedup_vs_single": _ratio(t_single, wall),
                "speedup_vs_default": _ratio(t_default, wall),
                "efficiency": _ratio(t_single, wall * w),
                "recognition_wall_s": rec_wall,
                "recognition_speedup": _ratio(r_single, rec_wall),
                "recognition_efficiency": _ratio(r_single, rec_wall * w) if rec_wall else None,
                "recognize_sum_s": _median([r["timings"]["recognize_s"] for r in dist]),
                # per-tile recognizer time in the workers over the 1-thread in-process one: > 1 means the W
                # processes did not each get a core (other load, shared cores) or the tile GET adds up
                "recognizer_inflation": _ratio(_median([r["timings"]["recognize_s"] for r in dist]), r_single),
                "serial_s": serial,
                "serial_share": _ratio(serial, wall),
                "stages": {name: _median([s[name] for s in staged]) for name in STAGES} if staged else {},
                "publish_s": _median([s["publish_total"] for s in staged]),
                "overlapped_decode_s": _median([s.get("overlapped_decode", 0.0) for s in staged]),
                "overhead_ms_per_tile": _ratio((wall - t_default) * 1000, dist[0]["tiles"]) if t_default else None,
            }
            entry["slower_than_inproc"] = _ratio(wall, min(t for t in (t_default, t_single) if t))
            # the same stage with W one-thread processes, a perfect split and no Celery: the hardware's own limit
            ceiling = _median([r["wall_s"] for r in _by(runs, phase="ceiling", recognizer=recognizer, workers=w)
                               if r.get("input", "PNG") == source])  # fmt: skip
            entry["ceiling_recognition_s"] = ceiling
            entry["ceiling_efficiency"] = _ratio(r_single, ceiling * w) if ceiling else None
            entry["share_of_ceiling"] = _ratio(ceiling, rec_wall)
            tasks = dist[0]["tasks"]
            busy = _median([s["tile_task_busy"] for s in staged])
            if busy is not None and entry["recognize_sum_s"] is not None and rec_wall:
                # inside tile tasks but outside the recognizer, per batch: cancel check, records, progress, tile
                # GETs, and the task's own (result and chord counting)
                entry["in_task_overhead_ms"] = 1000 * (busy - entry["recognize_sum_s"]) / entry["batches"]
                # between two tasks of one process (ack, next message), read off each process's own timeline
                gaps = _median([s.get("idle_between") for s in staged])
                processes = _median([s.get("tile_processes") for s in staged]) or w
                entry["between_tasks_ms"] = 1000 * gaps / max(1, tasks - processes) if gaps is not None else None
                # idle at the stage's ends, all processes: a late first task (the tiling task's process publishes
                # the chord meanwhile) and an early last one (the others still run theirs)
                entry["idle_start_ms"] = _ms(_median([s.get("idle_lead") for s in staged]))
                entry["idle_end_ms"] = _ms(_median([s.get("idle_tail") for s in staged]))
            row["by_workers"][str(w)] = entry
        rows.append(row)
    return rows


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else 1000 * seconds


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def batches_of(run: dict[str, Any]) -> int:
    """A run's batches (results without the count had one batch per task)."""
    return run.get("batches", run["tasks"])


def batch_curve(runs: list[dict[str, Any]], speed_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Efficiency and per-tile overhead against tiles per batch, from the batch phase plus the speed baselines."""
    baselines = {row["recognizer"]: row for row in speed_rows if row.get("input", "PNG") == "PNG"}
    rows = []
    for run in runs:
        if run.get("phase") != "batch" or not _ok(run):
            continue
        base = baselines.get(run["recognizer"])
        if base is None:
            continue
        w, tiles = run["workers"], run["tiles"]
        stages = run.get("stages") or {}
        rows.append(
            {
                "recognizer": run["recognizer"],
                "workers": w,
                "batch_size": run["batch_size"],
                "tiles_per_batch": tiles / batches_of(run),
                "batches": batches_of(run),
                "tasks": run["tasks"],
                "wall_s": run["wall_s"],
                "efficiency": _ratio(base["inproc_single_s"], run["wall_s"] * w),
                "recognition_efficiency": _ratio(base["inproc_single_recognize_s"], stages.get("recognition", 0) * w),
                "overhead_ms_per_tile": _ratio((run["wall_s"] - (base["inproc_default_s"] or 0)) * 1000, tiles)
                if base["inproc_default_s"]
                else None,
            }
        )
    return sorted(rows, key=lambda r: (r["recognizer"], r["workers"], r["tiles_per_batch"]))


def what_if(runs: list[dict[str, Any]], speed_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each what-if against today's configuration, both measured in the what-if phase, side by side."""
    singles = {row["recognizer"]: row["inproc_single_s"] for row in speed_rows if row.get("input", "PNG") == "PNG"}
    rows = []
    for recognizer in sorted({r["recognizer"] for r in runs if r.get("phase") == "whatif"}):
        sel = [r for r in runs if r.get("phase") == "whatif" and r["recognizer"] == recognizer and _ok(r)]
        names = list(dict.fromkeys(r["whatif"] for r in sel if r["mode"] == 3))
        today = _median([r["wall_s"] for r in sel if r["mode"] == 3 and r["whatif"] == "today"])
        for name in names:
            dist = [r for r in sel if r["mode"] == 3 and r["whatif"] == name]
            local = [r for r in sel if r["mode"] == 2 and r["whatif"] == name]
            wall = _median([r["wall_s"] for r in dist])
            single = _median([r["wall_s"] for r in local]) if local else singles.get(recognizer)
            staged = [r["stages"] for r in dist if r.get("stages")]
            w = dist[0]["workers"]
            rows.append(
                {
                    "recognizer": recognizer,
                    "whatif": name,
                    "workers": w,
                    "tiles": dist[0]["tiles"],
                    "batches": batches_of(dist[0]),
                    "tasks": dist[0]["tasks"],
                    "wall_s": wall,
                    "vs_today": _ratio(wall, today),
                    "inproc_single_s": single,
                    "speedup_vs_single": _ratio(single, wall),
                    "stages": {name: _median([s[name] for s in staged]) for name in STAGES} if staged else {},
                    "publish_s": _median([s["publish_total"] for s in staged]),
                }
            )
    return rows


def latency(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The one-tile job: today's configuration, plus each what-if configuration measured on it."""
    today = _latency_of([r for r in runs if r.get("phase") == "latency" and not r.get("whatif")], runs)
    if today is None:
        return None
    others = {r["whatif"] for r in runs if r.get("phase") == "latency" and r.get("whatif")}
    today["whatif"] = {
        name: _latency_of([r for r in runs if r.get("phase") == "latency" and r.get("whatif") == name], [])
        for name in sorted(others)
    }
    return today


def _latency_of(selected: list[dict[str, Any]], runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    dist = [r for r in selected if r["mode"] == 3 and _ok(r)]
    local = [r for r in runs if r.get("phase") == "latency" and r["mode"] == 2 and _ok(r)]
    if not dist:
        return None
    overheads = [(r["wall_s"] - r["timings"]["recognize_s"]) * 1000 for r in dist]
    staged = [r["stages"] for r in dist if r.get("stages")]
    return {
        "recognizer": dist[0]["recognizer"],
        "workers": dist[0]["workers"],
        "reps": len(dist),
        "end_to_end_ms": _median([r["wall_s"] * 1000 for r in dist]),
        "recognizer_ms": _median([r["timings"]["recognize_s"] * 1000 for r in dist]),
        "overhead_ms": _median(overheads),
        "overhead_ms_min": min(overheads),
        "in_process_ms": _median([r["wall_s"] * 1000 for r in local]),
        "stages_ms": {name: _median([s[name] * 1000 for s in staged]) for name in STAGES} if staged else {},
    }


def memory(anatomy: list[dict[str, Any]]) -> dict[str, Any]:
    rows = [a for a in anatomy if "error" not in a]
    if len(rows) < 2:
        return {"rows": rows}
    small, large = min(rows, key=lambda a: a["size"]), max(rows, key=lambda a: a["size"])
    peak = {a["size"]: max(a["memory_mb"]["tile_processes"]) for a in rows}
    return {
        "rows": rows,
        "tile_process_growth": peak[large["size"]] / peak[small["size"]],
        "tile_process_peak_mb": peak,
    }


def targets(summary: dict[str, Any], machine_cores: int) -> list[dict[str, Any]]:
    """The issue's targets against what this run measured; `met` is None where the run could not measure it."""
    rows: list[dict[str, Any]] = []

    def add(what: str, target: str, value: Any, met: bool | None, note: str = "") -> None:
        rows.append({"target": what, "goal": target, "value": value, "met": met, "note": note})

    w_max = str(max((int(w) for row in summary["speed"] for w in row["by_workers"]), default=1))
    for row in summary["speed"]:
        entry = row["by_workers"].get(w_max)
        if not entry or row["recognizer"] == "aruco":
            continue
        label = f"{row['recognizer']} {row['size']}² {row.get('input', 'PNG')}, W={w_max}"
        s1, sd, re_ = entry["speedup_vs_single"], entry["speedup_vs_default"], entry["recognition_efficiency"]
        add(f"end-to-end speedup over single-threaded in-process ({label})", "≥ 1.7", s1, _ge(s1, 1.7))
        add(f"end-to-end speedup over default-threaded in-process ({label})", "≥ 1.1", sd, _ge(sd, 1.1))
        ceiling = entry.get("ceiling_efficiency")
        note = (
            f"the hardware's ceiling here is {ceiling:.2f} ({w_max} one-thread processes, perfect split, no Celery): "
            f"tilerec's recognition stage took ×{1 / entry['share_of_ceiling']:.2f} its time"
            if ceiling and entry.get("share_of_ceiling")
            else ""
        )
        add(f"recognition-stage efficiency ({label})", "≥ 0.9", re_, _ge(re_, 0.9), note)
    for row in summary["speed"]:
        if row["recognizer"] != "aruco":
            continue
        worst = max((e["slower_than_inproc"] or 0 for e in row["by_workers"].values()), default=None)
        label = f"aruco {row['size']}² {row.get('input', 'PNG')}"
        add(f"{label}: distributed time / best in-process time, worst W", "≤ 1.10", worst, _le(worst, 1.1))
    for row in summary["speed"]:
        entry = row["by_workers"].get("1")
        if entry and entry["overhead_ms_per_tile"] is not None:
            add(
                f"overhead per tile, W=1 vs in-process ({row['recognizer']} {row.get('input', 'PNG')}, auto batch)",
                "≤ 2 ms",
                entry["overhead_ms_per_tile"],
                _le(entry["overhead_ms_per_tile"], 2.0),
            )
    messages = [a["messages"]["recognize_tiles"]["max_bytes"] for a in summary["memory"]["rows"]]
    if messages:
        add("broker message per tile task (largest seen)", "≤ 2048 B", max(messages), _le(max(messages), 2048))
    if "tile_process_growth" in summary["memory"]:
        growth = summary["memory"]["tile_process_growth"]
        sizes = sorted(summary["memory"]["tile_process_peak_mb"])
        add(f"tile worker peak RSS, {sizes[-1]}² over {sizes[0]}²", "≤ 1.10 (no growth)", growth, _le(growth, 1.1))
    if summary["latency"]:
        value = summary["latency"]["overhead_ms"]
        add("one-tile image: end-to-end minus recognizer time (median)", "≤ 30 ms", value, _le(value, 30))
    duplicates = [m["distributed"]["score"]["duplicates"] for m in _modes(summary, "distributed")]
    if duplicates:
        add("duplicates in distributed results (all scenes)", "0", sum(duplicates), sum(duplicates) == 0)
    identical = [row["identical_2_3"] for row in summary["accuracy"] if row["identical_2_3"] is not None]
    if identical:
        add(
            "tiled in-process and distributed detections identical (all scenes)", "true", all(identical), all(identical)
        )
    if machine_cores != 2:
        for row in rows:
            row["note"] = (row["note"] + f" targets are set for 2 cores; this machine has {machine_cores}").strip()
    return rows


def _modes(summary: dict[str, Any], mode: str) -> list[dict[str, Any]]:
    return [row["modes"] for row in summary["accuracy"] if "score" in row["modes"].get(mode, {})]


def _ge(value: float | None, bound: float) -> bool | None:
    return None if value is None else value >= bound


def _le(value: float | None, bound: float) -> bool | None:
    return None if value is None else value <= bound


def _upgrade(runs: list[dict[str, Any]]) -> None:
    """Results written before load and decode became one stage (read_decode) read like newer ones."""
    for run in runs:
        stages = run.get("stages")
        if stages and "read_decode" not in stages and "load" in stages:
            stages["read_decode"] = stages.pop("load") + stages.pop("decode")
            stages.setdefault("publish_total", stages["dispatch"])
        if stages and "idle_lead" not in stages and run.get("timeline"):  # written before idle_time existed
            rows = [r for r in run["timeline"] if r["task"] == "recognize_tiles" and r["start"] is not None]
            stages.update(idle_time([(r["process"], r["start"], r["end"]) for r in rows if r["end"] is not None]))


def idle_time(spans: list[tuple[str, float, float]]) -> dict[str, float]:
    """Idle time of the processes that ran tile tasks (process, start, end) during the recognition stage, summed
    over processes, by where it falls: before a process's first task (the tiling task's process is still publishing
    the chord), between two of its tasks (the ack and the next message), after its last (the others still run)."""
    if not spans:
        return {"idle_lead": 0.0, "idle_between": 0.0, "idle_tail": 0.0, "tile_processes": 0}
    first, last = min(start for _, start, _ in spans), max(end for _, _, end in spans)
    by_process: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for process, start, end in spans:
        by_process[process].append((start, end))
    lead = between = tail = 0.0
    for lane in by_process.values():
        lane.sort()
        lead += lane[0][0] - first
        tail += last - lane[-1][1]
        between += sum(max(0.0, b[0] - a[1]) for a, b in pairwise(lane))
    return {"idle_lead": lead, "idle_between": between, "idle_tail": tail, "tile_processes": len(by_process)}


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    runs = results.get("runs", [])
    _upgrade(runs)
    workers = list(results["profile"]["workers"])
    summary: dict[str, Any] = {"accuracy": accuracy(runs), "speed": speed(runs, workers)}
    summary["batch"] = batch_curve(runs, summary["speed"])
    summary["latency"] = latency(runs)
    summary["whatif"] = what_if(runs, summary["speed"])
    summary["memory"] = memory(results.get("anatomy", []))
    summary["errors"] = [
        {k: r.get(k) for k in ("phase", "scene", "recognizer", "variant", "error")} for r in runs if "error" in r
    ]
    summary["targets"] = targets(summary, results["machine"]["cores"])
    return summary
