"""The Markdown report: targets first, then each measurement with its table and plot, then what the numbers say
about where the time goes. Written from results.json alone."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from bench.analysis import STAGES

STAGE_NOTES = {
    "queue_in": "submit → tiling task starts",
    "read_decode": "read and decode the image (serial)",
    "store": "put the tiles in Redis",
    "dispatch": "publish the chord's tile messages",
    "to_first_tile": "→ first tile task starts",
    "recognition": "first tile start → last tile end",
    "gather": "last tile → merge starts",
    "merge": "merge + delete the job's keys",
    "deliver": "result → client",
}


def _f(value: Any, digits: int = 2, unit: str = "") -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, int):
        return f"{value:,}{unit}"
    if isinstance(value, float):
        return f"{value:.{digits}f}{unit}"
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_f(cell) if not isinstance(cell, str) else cell for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _met(value: bool | None) -> str:
    return {True: "✅ met", False: "❌ not met", None: "– not measured"}[value]


def header(results: dict[str, Any], command: str) -> str:
    m = results["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    load_start = "/".join(f"{x:.2f}" for x in m["load_average_start"])
    load_end = "/".join(f"{x:.2f}" for x in m.get("load_average_end", m["load_average_start"]))
    capacity = [m.get("cpu_capacity_start"), m.get("cpu_capacity_end")]
    capacity_text = " → ".join(_f(c) for c in capacity if c is not None)
    # the load average at the end is the benchmark's own load; before it starts, and the calibration loop run at
    # the start and at the end, tell whether other processes competed
    busy = m["load_average_start"][0] > 0.5 or any(c is not None and c < 0.85 * m["cores"] for c in capacity)
    warning = (
        f"\n> **Noisy machine**: the load average was {load_start} before the run, and {m['cores']} busy processes "
        f"got {capacity_text} cores' worth of CPU (a {m['cores']}-process calibration loop against one alone, at the "
        "start and at the end): other processes competed for the CPU, so the ratios understate what W processes "
        "get on a quiet machine. Rerun there before quoting.\n"
        if busy
        else ""
    )
    if m.get("code_end") and m.get("code_end") != m.get("code_start"):
        warning += (
            "\n> **The code changed during the run** (tasks/, pipeline/ or celeryconfig.py): clusters and "
            "interpreters started later ran the newer code, so figures from different phases may not compare.\n"
        )
    return (
        f"# tilerec benchmark ({results['profile']['name']} profile)\n\n"
        f"`{command}` — {datetime.now().strftime('%Y-%m-%d %H:%M')}, {results['duration_s'] / 60:.1f} min.\n\n"
        f"Machine: {m['cpu']}, **{m['cores']} cores**, {m['memory_gb']} GB, Linux {m['kernel']}. {versions}. "
        f"tilerec {m['git']}. Load average at start {load_start}, at end {load_end}; CPU capacity "
        f"(cores' worth a {m['cores']}-process loop got) {capacity_text}.\n{warning}\n"
        "Modes: **1** whole image in one recognizer call (no tiling); **2** tiled in one process "
        "(`pipeline.recognize_image`, same tiles and merge as tilerec: what SAHI does); **3** tilerec over W worker "
        "processes (`celery worker --concurrency W`, real Redis). Times of 2 and 3 run from the image file on disk "
        "to the merged result; 2 runs in a fresh interpreter per variant.\n"
    )


def targets_section(summary: dict[str, Any]) -> str:
    rows = [[t["target"], t["goal"], _f(t["value"], 2), _met(t["met"]), t["note"]] for t in summary["targets"]]
    return "## Targets\n\n" + _table(["what", "target", "measured", "", "note"], rows)


def accuracy_section(summary: dict[str, Any], plots: dict[str, str]) -> str:
    rows = []
    for row in summary["accuracy"]:
        for mode in ("whole", "tiled", "distributed"):
            entry = row["modes"].get(mode)
            if entry is None:
                continue
            if "score" not in entry:
                rows.append([row["scene"], row["recognizer"], mode, entry.get("note", ""), "", "", "", "", "", ""])
                continue
            s = entry["score"]
            places = ", ".join(f"{k} {v['recall']:.2f}" for k, v in s["by_placement"].items())
            same = _f(row["identical_2_3"]) if mode == "distributed" else ""
            rows.append(
                [
                    row["scene"],
                    row["recognizer"],
                    f"{mode} ({entry['variant']})",
                    s["truths"],
                    _f(s["recall"]),
                    _f(s["precision"]),
                    s["duplicates"],
                    _f(s["mean_iou"]),
                    places,
                    same,
                ]
            )
    text = "## Accuracy\n\n"
    text += (
        "Ground truth from the seeded scenes (`pipeline.scenes.codes.code_scene`: QR codes, ArUco markers and EAN-13 "
        "barcodes mixed, a share across tile seams and at the image edges; `pipeline.scenes.photos`: pasted "
        "astronaut faces, people and drawn clocks). A detection matches an object of the same label and payload "
        "with box IoU ≥ 0.5 (barcodes ≥ 0.3: OpenCV's box covers the middle of the bars only). Duplicates: an object "
        "reported more than once. Recall by placement: inside one tile / across a seam / at an image edge.\n\n"
    )
    text += _table(
        [
            "scene",
            "recognizer",
            "mode",
            "objects",
            "recall",
            "precision",
            "duplicates",
            "mean IoU",
            "recall by placement",
            "2 = 3",
        ],
        rows,
    )
    if "accuracy" in plots:
        text += f"\n![recall against image size]({plots['accuracy']})\n"
    return text


def speed_section(summary: dict[str, Any], plots: dict[str, str]) -> str:
    rows, stage_rows = [], []
    for row in summary["speed"]:
        base = [row["recognizer"], f"{row['size']}² {row.get('input', 'PNG')} ({row['tiles']} tiles)"]
        cores_used = f"uses {_f(row['inproc_default_cores_used'])} cores"
        rows.append([*base, "in-process, default threads", _f(row["inproc_default_s"]), "", "", "", "", cores_used])
        rows.append([*base, "in-process, 1 thread", _f(row["inproc_single_s"]), "", "", "", "", ""])
        for w, e in sorted(row["by_workers"].items(), key=lambda kv: int(kv[0])):
            serial = (
                f"serial {_f(e['serial_s'])} s ({_f(100 * (e['serial_share'] or 0), 0)} %); "
                f"recognizer ×{_f(e.get('recognizer_inflation'))} per tile"
                + (f"; hardware ceiling {_f(e['ceiling_efficiency'])}" if e.get("ceiling_efficiency") else "")
            )
            ratios = [
                _f(e[k]) for k in ("speedup_vs_single", "speedup_vs_default", "efficiency", "recognition_efficiency")
            ]
            rows.append([*base, f"tilerec W={w} ({e['batches']} batches)", _f(e["wall_s"]), *ratios, serial])
            per_task = [
                _f(e.get("in_task_overhead_ms"), 1),
                _f(e.get("between_tasks_ms"), 1),
                f"{_f(e.get('idle_start_ms'), 0)} + {_f(e.get('idle_end_ms'), 0)}",
            ]
            stages = [_f(1000 * (e["stages"].get(s) or 0), 0) for s in STAGES]
            label = f"{row['recognizer']} ({row.get('input', 'PNG')})"
            stage_rows.append([label, w, *stages, _f(1000 * (e["recognize_sum_s"] or 0), 0), *per_task])
    text = "## Speed\n\n"
    text += (
        "Medians of the repetitions. Speedup = in-process time / tilerec time; efficiency = speedup over the "
        "1-thread in-process run / W; recognition efficiency = 1-thread in-process recognizer time / (W × tilerec's "
        "recognition-stage wall time). Serial = queue + load + decode + store + dispatch of the tiling task. "
        "Hardware ceiling: the recognition efficiency of W one-thread processes that share the tiles perfectly, with "
        "no Celery at all, measured beside each run (below 1: the W processes slow each other on this machine). "
        "Recognizer ×: the workers' summed per-tile recognizer time over the 1-thread in-process one (above 1: the "
        "W processes did not each get a whole core, or the tile GET, which the workers' per-tile time includes, "
        "adds up).\n\n"
    )
    text += _table(
        [
            "recognizer",
            "scene",
            "variant",
            "wall s",
            "speedup vs 1 thread",
            "speedup vs default",
            "efficiency",
            "recognition efficiency",
            "notes",
        ],
        rows,
    )
    text += "\n### Stages of a tilerec job (ms, medians)\n\n"
    text += ", ".join(f"**{s}**: {STAGE_NOTES[s]}" for s in STAGES) + ". They add up to the wall time.\n\n"
    text += (
        "Σ recognizer: the recognizer's own time summed over tiles. In-task overhead per batch = the tile tasks' "
        "runtime minus their recognizer time, over their batches (the cancel check, the records, "
        "a progress report, tile GETs, and each task's own bookkeeping: its result, chord counting); between "
        "tasks = idle time of a worker process between two of its tile tasks (ack, fetching the next message). "
        "Idle at start + end: all processes' idle time before their first tile task (the tiling task's process "
        "publishes the chord meanwhile) and after their last (the others still run theirs).\n\n"
    )
    per_task_columns = ["in-task overhead ms/batch", "between tasks ms", "idle at start + end ms"]
    header = ["recognizer", "W", *STAGES, "Σ recognizer", *per_task_columns]
    text += _table(header, stage_rows)
    for name, caption in (("stages", "where the time goes"), ("timeline", "one job, one lane per worker process")):
        if name in plots:
            text += f"\n![{caption}]({plots[name]})\n"
    return text


def batch_section(summary: dict[str, Any], plots: dict[str, str]) -> str:
    rows = [
        [
            r["recognizer"],
            r["workers"],
            str(r["batch_size"]),
            _f(r["tiles_per_batch"], 1),
            r["batches"],
            _f(r["wall_s"]),
            _f(r["efficiency"]),
            _f(r["recognition_efficiency"]),
            _f(r["overhead_ms_per_tile"]),
        ]
        for r in summary["batch"]
    ]
    if not rows:
        return ""
    text = "## Tiles per batch\n\n"
    text += (
        "The `batch_size` option on the speed scene. Efficiency as above; overhead per tile = (tilerec at W − "
        "in-process default threads) / tiles, meaningful at W = 1.\n\n"
    )
    text += _table(
        [
            "recognizer",
            "W",
            "batch_size",
            "tiles/batch",
            "batches",
            "wall s",
            "efficiency",
            "recognition efficiency",
            "overhead ms/tile",
        ],
        rows,
    )
    if "batch" in plots:
        text += f"\n![efficiency against tiles per batch]({plots['batch']})\n"
    return text


def memory_section(summary: dict[str, Any], plots: dict[str, str]) -> str:
    rows, message_rows = [], []
    for a in sorted(summary["memory"]["rows"], key=lambda r: r["size"]):
        mem = a["memory_mb"]
        tile_processes = ", ".join(_f(v, 0) for v in mem["tile_processes"])
        rows.append(
            [
                f"{a['size']}²",
                a["tiles"],
                _f(mem["tiling_process"], 0),
                tile_processes,
                _f(a.get("in_process_peak_mb"), 0),
                _f(mem["redis_peak"], 0),
                _f(a["image_bytes"] / 2**20, 1),
            ]
        )
        for kind, m in a["messages"].items():
            message_rows.append(
                [
                    f"{a['size']}²",
                    f"tilerec.{kind}",
                    m["count"],
                    m["max_bytes"],
                    _f(m["mean_bytes"], 0),
                    m["max_body_bytes"],
                    m["max_headers_bytes"],
                ]
            )
    if not rows:
        return ""
    text = "## Memory and broker messages\n\n"
    text += (
        "One job dissected (bench/anatomy.py): the tiling task on a jobs-only worker, the tiles on a fresh "
        "tiles-only worker with W processes, their messages read off the Redis lists while nobody consumed them. "
        "Peak RSS = VmHWM of each pool process.\n\n"
    )
    text += _table(
        [
            "image",
            "tiles",
            "tiling process MiB",
            "tile processes MiB",
            "in-process MiB",
            "redis-server peak MiB",
            "PNG file MiB",
        ],
        rows,
    )
    text += "\n" + _table(
        ["image", "task", "messages", "max bytes", "mean bytes", "max body (decoded)", "max headers"], message_rows
    )
    if "memory" in plots:
        text += f"\n![peak memory]({plots['memory']})\n"
    return text


def whatif_section(summary: dict[str, Any]) -> str:
    rows = []
    for r in summary.get("whatif", []):
        st = r["stages"]
        rows.append([r["recognizer"], r["whatif"], f"{r['workers']} ({r['batches']} batches)", _f(r["wall_s"]),
                     _f(r["vs_today"]), _f(r["speedup_vs_single"]), _f(1000 * (st.get("read_decode") or 0), 0),
                     _f(1000 * (r["publish_s"] or 0), 0), _f(1000 * (st.get("recognition") or 0), 0)])  # fmt: skip
    if not rows:
        return ""
    return (
        "## What would help: measured\n\n"
        "Changes the stage figures point at, run side by side with today's configuration on the speed scene "
        "(extra clusters started on bench/whatif/celeryconfig.py, which is tilerec's celeryconfig with the named "
        "settings replaced; tilerec itself is unchanged). The .npy row reads the same pixels from a .npy file "
        "(`pipeline.readers.sources.decode` loads it without a codec); its speedup is over the 1-thread in-process run "
        "on the same file. (The tiled TIFF, which needs no whole decode at all, is measured in the Speed section.)\n\n"
        + _table(
            [
                "recognizer",
                "what if",
                "W",
                "wall s",
                "× today",
                "speedup vs 1 thread",
                "read+decode ms",
                "publishing tile messages ms",
                "recognition ms",
            ],
            rows,
        )
    )


def latency_section(summary: dict[str, Any]) -> str:
    lat = summary["latency"]
    if not lat:
        return ""
    stages = ", ".join(f"{k} {_f(v, 1)}" for k, v in lat["stages_ms"].items())
    return (
        "## Latency of a one-tile image\n\n"
        f"A 640×480 image through the whole chord ({lat['recognizer']}, W={lat['workers']}, {lat['reps']} jobs): "
        f"end to end {_f(lat['end_to_end_ms'], 1)} ms, recognizer {_f(lat['recognizer_ms'], 1)} ms, so "
        f"**{_f(lat['overhead_ms'], 1)} ms** of overhead (best {_f(lat['overhead_ms_min'], 1)} ms); in-process the "
        f"same image takes {_f(lat['in_process_ms'], 1)} ms from the file. Stages (ms): {stages}.\n"
        + "".join(
            f"\n- what if {name}: overhead {_f(other['overhead_ms'], 1)} ms (best {_f(other['overhead_ms_min'], 1)})"
            for name, other in lat.get("whatif", {}).items()
            if other
        )
        + ("\n" if lat.get("whatif") else "")
    )


def storage_section(results: dict[str, Any], plots: dict[str, str]) -> str:
    storage = results.get("storage")
    if not storage:
        return ""
    rows = [
        [
            r["codec"],
            _f(r["lossless"]),
            _f(r["bytes"] / 1024, 0),
            _f(r["ratio"]),
            _f(r["encode_ms"]),
            _f(r["decode_ms"]),
            _f(r["put_ms"]),
            _f(r["get_ms"]),
        ]
        for r in storage["codecs"]
    ]
    s = storage["store"]
    text = "## Tile storage\n\n"
    shape = "×".join(str(d) for d in storage["tile_shape"])
    text += f"Per tile of {shape} from {storage['scene']}, through a local redis-server.\n\n"
    text += _table(
        ["codec", "lossless", "KiB", "size ratio", "encode ms", "decode ms", "encode+SET ms", "GET+decode ms"], rows
    )
    text += (
        f"\n`tasks.store.put_tiles` on the whole {storage['scene']} image: {s['tiles']} tiles, "
        f"{s['bytes_stored'] / 2**20:.0f} MiB stored for a {s['image_bytes'] / 2**20:.0f} MiB image "
        f"({s['bytes_stored'] / s['image_bytes']:.2f}×, the overlap), {s['put_tiles_s']:.2f} s "
        f"({_f(s['store_mb_per_s'], 0)} MiB/s); `get_tile` {s['get_tile_ms']:.2f} ms; `delete_job` (cleanup) "
        f"{1000 * s['delete_job_s']:.1f} ms.\n\n"
    )
    if storage.get("transports"):
        text += "Raw tiles through Redis by transport and pixel format (SET pipelined, GET one by one):\n\n"
        text += _table(
            ["transport", "pixels", "KiB per tile", "SET ms", "GET ms"],
            [[t["transport"], t["pixels"], _f(t["bytes"] / 1024, 0), _f(t["put_ms"]), _f(t["get_ms"])]
             for t in storage["transports"]],
        )  # fmt: skip
        text += "\n"
    text += "Decoding the input, the serial part of every job, by file format:\n\n"
    text += _table(
        ["format", "MiB", "decode s"],
        [[r["format"], _f(r["bytes"] / 2**20, 1), _f(r["decode_s"])] for r in storage["inputs"]],
    )
    if "codecs" in plots:
        text += f"\n![tile codecs]({plots['codecs']})\n"
    return text


def _speed_notes(row: dict[str, Any]) -> list[str]:
    """The serial floor (Amdahl's ceiling for this W) and the recognition stage's excess over the ideal."""
    top = max(row["by_workers"], key=int, default=None)
    if top is None or not row["by_workers"][top]["stages"] or not row["inproc_single_s"]:
        return []
    e, w = row["by_workers"][top], int(top)
    st, wall, single = e["stages"], e["wall_s"], row["inproc_single_s"]
    serial = st["queue_in"] + st["read_decode"] + st["store"] + st["dispatch"]
    recognize = row["inproc_single_recognize_s"] or 0.0
    ceiling = single / (serial + recognize / w) if serial + recognize else None
    excess = st["recognition"] - recognize / w
    label = f"{row['recognizer']} {row['size']}² {row.get('input', 'PNG')}, W={w}"
    notes = [
        f"**{label}**: {wall:.2f} s against {single:.2f} s in one thread. "
        f"Serial part {serial:.2f} s ({100 * serial / wall:.0f} %: read+decode {st['read_decode']:.2f}, store "
        f"{st['store']:.2f}, publishing {st['dispatch']:.2f}); with it, even a perfect recognition stage "
        f"({recognize:.2f} s / {w}) caps the speedup over one thread at **{_f(ceiling)}**."
    ]
    if e.get("overlapped_decode_s"):
        notes.append(
            f"Decoding the PNG and storing its tiles ({e['overlapped_decode_s']:.2f} s) overlapped the recognition "
            "stage: the tiling task decodes band by band after publishing the chord, and the tile tasks recognize "
            "each batch as soon as its tiles are stored, so the recognition stage here includes that serial work."
        )
    if e.get("publish_s") and e["publish_s"] > st["dispatch"] + 0.05:
        notes.append(
            f"Publishing the {e['tasks']} tile tasks took {e['publish_s']:.2f} s in all, most of it while other "
            f"processes had started on the tiles, but the process that publishes recognizes nothing meanwhile."
        )
    if e.get("in_task_overhead_ms") is not None:
        notes.append(
            f"Its recognition stage took {st['recognition']:.2f} s, {excess:.2f} s over the ideal: "
            f"{e['batches']} batches × {e['in_task_overhead_ms']:.1f} ms inside the tile tasks "
            f"outside the recognizer, "
            f"{_f(e.get('between_tasks_ms'), 1)} ms idle between two tasks of a process, "
            f"{_f(e.get('idle_start_ms'), 0)} ms idle before the processes' first tasks and "
            f"{_f(e.get('idle_end_ms'), 0)} ms after their last (all processes), and per-tile recognizer time "
            f"×{_f(e.get('recognizer_inflation'))} the 1-thread in-process one."
        )
    if e.get("ceiling_recognition_s"):
        notes.append(
            f"{w} one-thread processes sharing the same tiles perfectly, with no Celery, took "
            f"{e['ceiling_recognition_s']:.2f} s for this stage (efficiency {_f(e['ceiling_efficiency'])}: the "
            f"machine's own limit for {w} processes); tilerec took ×{_f(1 / e['share_of_ceiling'])} that."
        )
    return notes


def findings(results: dict[str, Any], summary: dict[str, Any]) -> str:
    """Where the time goes, in sentences with this run's numbers."""
    notes = [" ".join(_speed_notes(row)) for row in summary["speed"] if _speed_notes(row)]
    best_batch: dict[str, dict[str, Any]] = {}
    for r in (r for r in summary["batch"] if r["workers"] > 1 and r["efficiency"] is not None):
        if r["recognizer"] not in best_batch or r["efficiency"] > best_batch[r["recognizer"]]["efficiency"]:
            best_batch[r["recognizer"]] = r
    for recognizer, r in best_batch.items():
        auto = next((a for a in summary["batch"] if a["recognizer"] == recognizer and a["workers"] == r["workers"]
                     and a["batch_size"] == "auto"), None)  # fmt: skip
        if auto:
            notes.append(
                f"**Tiles per batch** ({recognizer}, W={r['workers']}): the best efficiency, {_f(r['efficiency'])}, "
                f"came at batch_size {r['batch_size']} ({r['batches']} batches); `auto` chose "
                f"{_f(auto['tiles_per_batch'], 1)} tiles per batch ({auto['batches']} batches) for "
                f"{_f(auto['efficiency'])}."
            )
    storage = results.get("storage")
    if storage:
        png, fastest = storage["inputs"][0], min(storage["inputs"], key=lambda r: r["decode_s"])
        s = storage["store"]
        notes.append(
            f"**Input decode** of {storage['scene']}: {png['decode_s']:.2f} s from PNG, {fastest['decode_s']:.2f} s "
            f"from {fastest['format']}. **Tile store**: {s['put_tiles_s']:.2f} s for {s['bytes_stored'] / 2**20:.0f} "
            f"MiB ({s['bytes_stored'] / s['image_bytes']:.2f}× the image: tiles overlap), cleanup "
            f"{1000 * s['delete_job_s']:.0f} ms."
        )
    for what in summary.get("whatif", []):
        if what["whatif"] != "today" and what["vs_today"] is not None:
            notes.append(
                f"**What if** {what['whatif']} ({what['recognizer']}): {what['wall_s']:.2f} s, "
                f"×{what['vs_today']:.2f} today's time, speedup over one thread {_f(what['speedup_vs_single'])}."
            )
    lat = summary["latency"]
    if lat:
        st = lat["stages_ms"]
        notes.append(
            f"**Per-job floor**: {lat['overhead_ms']:.1f} ms for a one-tile image (median), of which publishing the "
            f"chord {_f(st.get('dispatch'), 1)} ms, read+decode {_f(st.get('read_decode'), 1)} ms, the tile task "
            f"beyond its recognizer {_f((st.get('recognition') or 0) - lat['recognizer_ms'], 1)} ms, merge "
            f"{_f(st.get('merge'), 1)} ms."
        )
    messages = [a["messages"]["recognize_tiles"]["max_bytes"] for a in summary["memory"]["rows"]]
    if messages:
        notes.append(
            f"**Messages**: a batch task's message is at most {max(messages):,} B: the job id, its tile range and "
            "the chord's merge callback (the caller's arguments); the job's description is in the tile store, read "
            "once per job by each worker process, and the tile records go back through the store."
        )
    if summary["errors"]:
        notes.append(f"**{len(summary['errors'])} run(s) failed**; see the Errors section.")
    return "## Where the time goes\n\n" + "\n".join(f"- {n}" for n in notes) + "\n" if notes else ""


def errors_section(summary: dict[str, Any]) -> str:
    if not summary["errors"]:
        return ""
    rows = [
        [e["phase"], e["scene"], e["recognizer"], e["variant"], str(e["error"]).replace("|", "/")]
        for e in summary["errors"]
    ]
    return "## Errors\n\n" + _table(["phase", "scene", "recognizer", "variant", "error"], rows)


def render(results: dict[str, Any], summary: dict[str, Any], plots: dict[str, str], command: str) -> str:
    parts = [
        header(results, command),
        targets_section(summary),
        findings(results, summary),
        accuracy_section(summary, plots),
        speed_section(summary, plots),
        batch_section(summary, plots),
        memory_section(summary, plots),
        latency_section(summary),
        whatif_section(summary),
        storage_section(results, plots),
        errors_section(summary),
        "\nRaw figures: `results.json` (every run, its stages and timeline); derived figures: its `summary`.\n",
    ]
    return "\n".join(part for part in parts if part)
