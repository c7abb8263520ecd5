"""Tiles per second of `objects` against its `batch` (tiles per forward pass), on the CPU, through ONNX Runtime.

  python -m bench.batching [--tiles 64] [--repeats 3] [--threads N] [--batches 1,2,4,8,16,32]

The shared models cannot be batched: FastestDet and YuNet fix their batch axis at 1, and setting it to a name does
not help, since their graphs hard-code 1 in Reshape nodes. So this builds its own model with a dynamic batch axis
(`detector_model`, which the tests build theirs with too): a small convolutional detector with a YOLOv8-like
1×(4+C)×N output, random weights, detections that follow the pixels. Each batch size recognizes the same tiles end
to end (letterbox, one session run per pass, decoding, NMS); the best of `--repeats` runs counts.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

BATCHES = (1, 2, 4, 8, 16, 32)
COCO_CLASSES = 80
SCORE_THRESHOLD = 0.85  # on `bench_model`: some 20 to 60 detections a tile after NMS


def _conv(
    name: str, source: str, weights: np.ndarray, stride: int, pad: int = 0, bias: np.ndarray | None = None
) -> tuple[list, list]:
    """A convolution node, its weights and bias (default 0) as initializers."""
    from onnx import helper, numpy_helper

    bias = np.zeros(weights.shape[0], np.float32) if bias is None else bias.astype(np.float32)
    initializers = [numpy_helper.from_array(weights, f"{name}.w"), numpy_helper.from_array(bias, f"{name}.b")]
    kernel = list(weights.shape[2:])
    node = helper.make_node(
        "Conv", [source, f"{name}.w", f"{name}.b"], [name], kernel_shape=kernel, strides=[stride] * 2, pads=[pad] * 4
    )
    return [node], initializers


def detector_model(
    path: Path,
    head: str = "yolov8",
    batch: int | str = "batch",
    side: int = 160,
    classes: int = 3,
    width: int = 8,
    depth: int = 0,
    seed: int = 0,
) -> str:
    """A real network whose detections depend on the tile: a stride-4 convolution, `depth` 3×3 ones, and a stride-2
    head on a grid of side/8 cells, so N = (side/8)² candidates.

    Heads: `yolov8` (1×(4+C)×N: centre within 8 px of its cell, size 8..40 px, class scores), `yolov8-seg` (32 mask
    coefficients more, and 1×32×(side/4)² prototypes) and `fastestdet` (the 1×(5+C)×g×g grid). `batch` is the input's
    batch axis: a name (dynamic) or a number (fixed); class names c0, c1, … in the metadata, as Ultralytics writes.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    grid = side // 8
    coefficients = 32 if head == "yolov8-seg" else 0
    channels = (5 if head == "fastestdet" else 4) + classes + coefficients
    nodes, initializers = _conv("stem", "images", rng.normal(0, 0.3, (width, 3, 4, 4)).astype(np.float32), 4)
    nodes.append(helper.make_node("Relu", ["stem"], ["x0"]))
    for layer in range(depth):
        scale = np.sqrt(2 / (9 * width))  # He initialisation: the activations keep their spread through the layers
        weights = rng.normal(0, scale, (width, width, 3, 3)).astype(np.float32)
        conv, initial = _conv(f"c{layer}", f"x{layer}", weights, 1, 1)
        nodes += [*conv, helper.make_node("Relu", [f"c{layer}"], [f"x{layer + 1}"])]
        initializers += initial
    # scores are sigmoid(head): with a bias of -2 a few dozen candidates a tile score above 0.5 (yolov8, side 160)
    bias = np.zeros(channels)
    bias[(5 if head == "fastestdet" else 4) : channels - coefficients] = -2
    weights = rng.normal(0, 4 / width, (channels, width, 2, 2)).astype(np.float32)
    weights -= weights.mean(axis=(1, 2, 3), keepdims=True)  # scores follow local contrast, not brightness
    conv, initial = _conv("head", f"x{depth}", weights, 2, bias=bias)
    nodes += conv
    initializers += initial
    outputs = [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [batch, channels, grid, grid])]
    if head == "fastestdet":
        nodes.append(helper.make_node("Sigmoid", ["head"], ["output0"]))
    else:
        cells = (np.arange(grid) * 8 + 4).astype(np.float32)
        x, y = np.meshgrid(cells, cells)
        # columns: cx = cell + 16·(s - 0.5), cy likewise, w and h = 8 + 32·s, class scores s, coefficients 8·(s - 0.5)
        gain = np.array([16, 16, 32, 32, *[1] * classes, *[8] * coefficients], np.float32)
        offset = np.zeros((channels, grid * grid), np.float32)
        offset[0], offset[1], offset[2:4] = x.ravel() - 8, y.ravel() - 8, 8
        offset[channels - coefficients :] = -4
        initializers += [
            numpy_helper.from_array(np.array([0, channels, -1], np.int64), "rows"),  # 0: the batch axis as it comes
            numpy_helper.from_array(gain.reshape(1, channels, 1), "gain"),
            numpy_helper.from_array(offset[None], "offset"),
        ]
        nodes += [
            helper.make_node("Reshape", ["head", "rows"], ["flat"]),
            helper.make_node("Sigmoid", ["flat"], ["squashed"]),
            helper.make_node("Mul", ["squashed", "gain"], ["scaled"]),
            helper.make_node("Add", ["scaled", "offset"], ["output0"]),
        ]
        outputs = [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [batch, channels, grid * grid])]
    if coefficients:
        protos, initial = _conv("output1", "x0", rng.normal(0, 1.0, (32, width, 1, 1)).astype(np.float32), 1)
        nodes += protos
        initializers += initial
        outputs.append(helper.make_tensor_value_info("output1", TensorProto.FLOAT, [batch, 32, side // 4, side // 4]))
    graph = helper.make_graph(
        nodes,
        "detector",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [batch, 3, side, side])],
        outputs,
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9  # readable by older ONNX Runtime releases too
    helper.set_model_props(model, {"names": repr({i: f"c{i}" for i in range(classes)})})
    onnx.save(model, str(path))
    return str(path)


def tiles(count: int, width: int = 640, height: int = 640, seed: int = 0) -> list[np.ndarray]:
    """Different pictures, blobs of colour at several scales, so every tile has detections of its own."""
    import cv2

    rng = np.random.default_rng(seed)
    pictures = []
    for _ in range(count):
        coarse = rng.integers(0, 256, (max(2, height // 32), max(2, width // 32), 3)).astype(np.uint8)
        fine = rng.integers(0, 64, (height, width, 3)).astype(np.uint8)
        pictures.append(cv2.add(cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC), fine))
    return pictures


def build(model: str, batch: int, **params: Any) -> Any:
    """A fresh `objects` recognizer (not the process's cached one: each batch size gets its own session)."""
    from pipeline.recognizers import get_spec, resolve_params

    return get_spec("objects").factory(**resolve_params("objects", {"model": model, "batch": batch, **params}))


def rates(recognizers: Sequence[Any], pictures: Sequence[np.ndarray], repeats: int) -> list[float]:
    """Tiles per second of each recognizer over all the pictures, the best of `repeats` rounds. Each round takes
    the recognizers in turn, so a load that comes and goes on shared cores weighs on all of them alike; one pass
    each first, as ORT plans its buffers on its first run."""
    for recognizer in recognizers:
        recognizer.recognize_batch(list(pictures[: recognizer.max_batch]))
    best = [float("inf")] * len(recognizers)
    for _ in range(repeats):
        for k, recognizer in enumerate(recognizers):
            began = time.perf_counter()
            recognizer.recognize_batch(list(pictures))
            best[k] = min(best[k], time.perf_counter() - began)
    return [len(pictures) / seconds for seconds in best]


def bench_model(folder: Path) -> str:
    """About a fifth of YOLOv8n's work per 640×640 tile, with its 80 classes and its 6400 stride-8 candidates."""
    return detector_model(folder / "bench.onnx", side=640, classes=COCO_CLASSES, width=32, depth=3)


def shared_models() -> list[str]:
    """The batch axis of each shared model found in TILEREC_MODEL_DIR (or ../shared/models)."""
    import onnxruntime

    folder = Path(os.environ.get("TILEREC_MODEL_DIR") or Path(__file__).resolve().parents[2] / "shared" / "models")
    lines = []
    for path in sorted(folder.glob("*.onnx")):
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        shape = session.get_inputs()[0].shape
        axis = f"fixed at {shape[0]}" if isinstance(shape[0], int) else "dynamic"
        lines.append(f"{path.name}: input {shape}, batch axis {axis}")
    return lines


def table(rows: list[tuple[int, float]]) -> str:
    """Batch size, tiles/s, ms a tile, and tiles/s against batch 1, as Markdown."""
    base = rows[0][1]
    lines = ["| batch | tiles/s | ms/tile | vs batch 1 |", "| ---: | ---: | ---: | ---: |"]
    lines += [f"| {batch} | {rate:.1f} | {1000 / rate:.1f} | {rate / base:.2f}× |" for batch, rate in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.batching", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiles", type=int, default=64, help="640×640 tiles recognized per run (default 64)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per batch size; the best counts (default 3)")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (default: the cores)")
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)), help="batch sizes (default 1,…,32)")
    args = parser.parse_args(argv)
    from pipeline.recognizers import limit_threads

    if args.threads:
        limit_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory() as folder:
        model = bench_model(Path(folder))
        recognizers = [build(model, batch, score_threshold=SCORE_THRESHOLD) for batch in batches]
        rows = list(zip(batches, rates(recognizers, tiles(args.tiles), args.repeats), strict=True))
    threads = args.threads or os.cpu_count()
    print(f"objects on the CPU: {args.tiles} tiles of 640×640, threads: {threads}, a 640×640 dynamic-batch detector")
    print(f"({COCO_CLASSES} classes, 6400 candidates a tile; `python -m bench.batching --help`)\n")
    print(table(rows))
    print("\nshared models: " + ("; ".join(shared_models()) or "none found"))


if __name__ == "__main__":
    main()
