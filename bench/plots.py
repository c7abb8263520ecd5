"""The report's PNG plots (matplotlib, headless). Each function takes the summary and returns the file it wrote,
or None when the run has nothing to draw."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.analysis import batches_of

STAGE_COLOURS = {
    "queue_in": "#bbbbbb",
    "read_decode": "#d62728",
    "store": "#ff7f0e",
    "dispatch": "#e377c2",
    "to_first_tile": "#c7c7c7",
    "recognition": "#2ca02c",
    "gather": "#9467bd",
    "merge": "#1f77b4",
    "deliver": "#7f7f7f",
    "read_s": "#8c564b",
    "decode_s": "#d62728",
    "recognize_s": "#2ca02c",
    "merge_s": "#1f77b4",
}
MODE_STYLE = {"whole": ("s", ":"), "tiled": ("o", "-"), "distributed": ("x", "--")}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def available() -> bool:
    try:
        _pyplot()
    except ImportError:
        return False
    return True


def accuracy(summary: dict[str, Any], folder: Path) -> Path | None:
    """Recall against image size per recognizer: one pass over the whole image against tiled (2) and distributed (3)."""
    rows = summary["accuracy"]
    recognizers = sorted({r["recognizer"] for r in rows})
    if not recognizers:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(recognizers), figsize=(3.2 * len(recognizers), 3.4), squeeze=False, sharey=True)
    for ax, recognizer in zip(axes[0], recognizers, strict=True):
        mine = sorted((r for r in rows if r["recognizer"] == recognizer), key=lambda r: r["size"])
        for mode, (marker, line) in MODE_STYLE.items():
            points = [
                (r["size"], r["modes"][mode]["score"]["recall"]) for r in mine if "score" in r["modes"].get(mode, {})
            ]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker=marker, linestyle=line, label=mode)
        ax.set_title(recognizer)
        ax.set_xscale("log")
        ax.set_xlabel("image side (px)")
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("recall")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, folder / "accuracy.png")


def speed(summary: dict[str, Any], folder: Path) -> Path | None:
    """Stage breakdown per variant at the speed size: where each variant's wall time goes."""
    rows = summary["speed"]
    if not rows:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(len(rows), 1, figsize=(9, 1.3 + 1.2 * len(rows) * 1.6), squeeze=False)
    for ax, row in zip(axes[:, 0], rows, strict=True):
        labels, bars = [], []
        for name, key in (("in-process, default threads", "inproc_default"), ("in-process, 1 thread", "inproc_single")):
            if row[f"{key}_s"] is not None:
                recognize = row[f"{key}_recognize_s"]
                rest = row[f"{key}_s"] - recognize - row["inproc_decode_s"]
                labels.append(name)
                bars.append({"read_decode": row["inproc_decode_s"], "recognition": recognize, "merge": max(0.0, rest)})
        for w, entry in sorted(row["by_workers"].items(), key=lambda kv: int(kv[0])):
            labels.append(f"tilerec, W={w}")
            bars.append(entry["stages"])
        for y, parts in enumerate(bars):
            left = 0.0
            for name, value in parts.items():
                if value is None or value <= 0 or name not in STAGE_COLOURS:
                    continue
                ax.barh(
                    y,
                    value,
                    left=left,
                    color=STAGE_COLOURS[name],
                    edgecolor="white",
                    linewidth=0.5,
                    label=name.removesuffix("_s"),
                )
                left += value
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(f"{row['recognizer']}, {row['size']}² {row.get('input', 'PNG')}, {row['tiles']} tiles", fontsize=9)
        ax.set_xlabel("seconds (end to end, from the file on disk)", fontsize=8)
    handles, names = axes[0, 0].get_legend_handles_labels()
    unique = dict(zip(names, handles, strict=True))
    fig.legend(unique.values(), unique.keys(), loc="lower center", ncol=6, fontsize=7)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return _save(fig, folder / "stages.png")


def timeline(runs: list[dict[str, Any]], folder: Path) -> Path | None:
    """One distributed job at the largest W as a Gantt chart, one lane per worker process."""
    candidates = [r for r in runs if r.get("phase") == "speed" and r.get("mode") == 3 and r.get("timeline")]
    if not candidates:
        return None
    top = max(r["workers"] for r in candidates)
    expensive = [r for r in candidates if r["workers"] == top and r["recognizer"] != "aruco"] or candidates
    run = max(expensive, key=lambda r: r["wall_s"])
    plt = _pyplot()
    lanes = sorted({row["process"] for row in run["timeline"] if row["process"]})
    fig, ax = plt.subplots(figsize=(9, 1 + 0.5 * len(lanes)))
    colours = {"recognize": "#d62728", "recognize_tiles": "#2ca02c", "merge": "#1f77b4"}
    for row in run["timeline"]:
        if row["start"] is None or row["end"] is None or row["process"] not in lanes:
            continue
        ax.barh(
            lanes.index(row["process"]),
            row["end"] - row["start"],
            left=row["start"],
            color=colours[row["task"]],
            edgecolor="white",
            linewidth=0.3,
        )
    ax.axvline(run["wall_s"], color="black", linewidth=0.8)
    ax.set_yticks(range(len(lanes)), lanes, fontsize=8)
    ax.set_xlabel("seconds since submit (red: tiling task, green: tile tasks, blue: merge; line: result at client)")
    title = (
        f"{run['recognizer']} on {run['scene']}, W={run['workers']}, {batches_of(run)} batches, {run['tasks']} tasks"
    )
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, folder / "timeline.png")


def batch(summary: dict[str, Any], folder: Path) -> Path | None:
    """Efficiency (end to end and recognition stage) and overhead per tile against tiles per batch."""
    rows = summary["batch"]
    if not rows:
        return None
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for recognizer in sorted({r["recognizer"] for r in rows}):
        for w in sorted({r["workers"] for r in rows}):
            mine = [r for r in rows if r["recognizer"] == recognizer and r["workers"] == w]
            fixed = [r for r in mine if r["batch_size"] != "auto"]
            auto = [r for r in mine if r["batch_size"] == "auto"]
            xs = [r["tiles_per_batch"] for r in fixed]
            if w > 1:
                line = left.plot(
                    xs, [r["efficiency"] for r in fixed], marker="o", label=f"{recognizer} W={w} end to end"
                )
                left.plot(xs, [r["recognition_efficiency"] for r in fixed], marker="x", linestyle="--",
                          color=line[0].get_color(), label=f"{recognizer} W={w} recognition")  # fmt: skip
                for r in auto:
                    left.plot(r["tiles_per_batch"], r["efficiency"], marker="*", markersize=12, linestyle="none",
                              color=line[0].get_color(), label=f"{recognizer} W={w} auto")  # fmt: skip
            else:
                line = right.plot(xs, [r["overhead_ms_per_tile"] for r in fixed], marker="o", label=f"{recognizer} W=1")
                for r in auto:
                    right.plot(r["tiles_per_batch"], r["overhead_ms_per_tile"], marker="*", markersize=12,
                               linestyle="none", color=line[0].get_color(), label=f"{recognizer} W=1 auto")  # fmt: skip
    left.axhline(0.9, color="grey", linewidth=0.6, linestyle=":")
    left.set(xscale="log", xlabel="tiles per batch", ylabel="parallel efficiency (vs 1-thread in-process)")
    right.axhline(2.0, color="grey", linewidth=0.6, linestyle=":")
    right.set(xscale="log", xlabel="tiles per batch", ylabel="ms per tile over in-process (W=1)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, folder / "batch.png")


def memory(summary: dict[str, Any], folder: Path) -> Path | None:
    rows = summary["memory"]["rows"]
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.2))
    groups = ["tiling process", "each tile process (max)", "in-process (SAHI-style)", "redis-server peak"]
    width = 0.8 / len(rows)
    for k, row in enumerate(sorted(rows, key=lambda r: r["size"])):
        mem = row["memory_mb"]
        values = [mem["tiling_process"], max(mem["tile_processes"]), row.get("in_process_peak_mb"), mem["redis_peak"]]
        xs = [g + k * width for g in range(len(groups))]
        ax.bar(xs, [v or 0 for v in values], width=width, label=f"{row['size']}²")
    ax.set_xticks([g + width * (len(rows) - 1) / 2 for g in range(len(groups))], groups, fontsize=8)
    ax.set_ylabel("peak RSS (MiB)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return _save(fig, folder / "memory.png")


def codecs(storage: dict[str, Any] | None, folder: Path) -> Path | None:
    if not storage:
        return None
    plt = _pyplot()
    rows = storage["codecs"]
    fig, ax = plt.subplots(figsize=(8, 3.2))
    names = [r["codec"] for r in rows]
    ax.barh(names, [r["put_ms"] for r in rows], label="encode + SET")
    ax.barh(names, [r["get_ms"] for r in rows], left=[r["put_ms"] for r in rows], label="GET + decode")
    for y, r in enumerate(rows):
        ax.annotate(
            f"{r['bytes'] / 1024:.0f} KiB",
            (r["put_ms"] + r["get_ms"], y),
            fontsize=7,
            xytext=(3, -3),
            textcoords="offset points",
        )
    ax.invert_yaxis()
    ax.set_xlabel(f"ms per {'×'.join(str(d) for d in storage['tile_shape'])} tile")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return _save(fig, folder / "codecs.png")


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def draw_all(results: dict[str, Any], summary: dict[str, Any], folder: Path) -> dict[str, str]:
    """Every plot this run can draw, as {name: file name}; empty when matplotlib is not installed."""
    if not available():
        return {}
    drawn = {
        "accuracy": accuracy(summary, folder),
        "stages": speed(summary, folder),
        "timeline": timeline(results.get("runs", []), folder),
        "batch": batch(summary, folder),
        "memory": memory(summary, folder),
        "codecs": codecs(results.get("storage"), folder),
    }
    return {name: path.name for name, path in drawn.items() if path is not None}
