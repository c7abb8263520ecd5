"""`objects` on the CPU against CUDA: tiles per second by batch size, through the providers a worker would use.

  python -m bench.device [--tiles 64] [--repeats 3] [--device 0] [--batches 1,2,4,8,16,32] [--dry-run]

Needs onnxruntime-gpu (the `gpu` extra, in place of onnxruntime) and an NVIDIA GPU; elsewhere it stops at once,
saying which is missing; `--dry-run` runs every step with the CPU provider in CUDA's place, to check the script
anywhere (the tests do). The model is bench.batching's dynamic-batch detector; each provider is set as a worker
sets it (`configure_execution`), so a CUDA provider that cannot start is caught as the workers would catch it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench.batching import BATCHES, SCORE_THRESHOLD, bench_model, build, rates, tiles

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def cuda_missing(model: str, device: int) -> str | None:
    """Why CUDA cannot run here (not in this onnxruntime; in it, but no GPU or CUDA library), or None."""
    import onnxruntime

    from pipeline.recognizers.dnn import configure_execution

    available = onnxruntime.get_available_providers()
    if CUDA not in available:
        return (
            f"this onnxruntime has no {CUDA} (it has {', '.join(available)}): install onnxruntime-gpu in its place "
            "(the `gpu` extra; docs/deployment.md, GPU workers) on a machine with an NVIDIA GPU"
        )
    configure_execution([CUDA], device)
    started = build(model, 1).session.get_providers()
    if CUDA not in started:
        return f"{CUDA} is in this onnxruntime but did not start on device {device} (no GPU, or CUDA's libraries)"
    return None


def on(model: str, providers: list[str], device: int, batches: Sequence[int], pictures: list, repeats: int) -> list:
    """Tiles per second at each batch size, the sessions on these providers."""
    from pipeline.recognizers.dnn import configure_execution

    configure_execution(providers, device)
    return rates([build(model, batch, score_threshold=SCORE_THRESHOLD) for batch in batches], pictures, repeats)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.device", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiles", type=int, default=64, help="640×640 tiles recognized per run (default 64)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per batch size; the best counts (default 3)")
    parser.add_argument("--device", type=int, default=0, help="the CUDA device number (default 0)")
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)), help="batch sizes (default 1,…,32)")
    parser.add_argument("--dry-run", action="store_true", help="the CPU provider in CUDA's place: checks the script")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory() as folder:
        model = bench_model(Path(folder))
        missing = None if args.dry_run else cuda_missing(model, args.device)
        if missing:
            sys.exit(f"python -m bench.device: {missing}")
        pictures = tiles(args.tiles)
        cpu = on(model, [CPU], args.device, batches, pictures, args.repeats)
        cuda = on(model, [CPU] if args.dry_run else [CUDA, CPU], args.device, batches, pictures, args.repeats)
    shown = "a dry run: the CPU provider in CUDA's place" if args.dry_run else f"CUDA device {args.device}"
    print(f"objects: {args.tiles} tiles of 640×640, bench.batching's detector, {shown}\n")
    print("| batch | CPU tiles/s | CUDA tiles/s | CUDA vs CPU | CUDA vs CUDA batch 1 |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for batch, on_cpu, on_cuda in zip(batches, cpu, cuda, strict=True):
        print(f"| {batch} | {on_cpu:.1f} | {on_cuda:.1f} | {on_cuda / on_cpu:.2f}× | {on_cuda / cuda[0]:.2f}× |")


if __name__ == "__main__":
    main()
