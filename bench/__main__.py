"""`python -m bench [--quick | --full | --smoke] [--out DIR] [overrides]`: run the benchmark, write the report.

Examples:
    python -m bench --quick                      # a couple of minutes, small scenes
    python -m bench --full                       # docs/performance.md's figures: 1000² … 16000², about 15 minutes
    python -m bench --full --speed-size 4000 --reps 3 --recognizers qrcode,objects
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import warnings
from pathlib import Path
from typing import Any

from rich.console import Console

from bench import analysis, plots, report
from bench.config import PROFILES, profile
from bench.runner import Bench, run


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part.strip())


def _batch_sizes(text: str) -> tuple[int | str, ...]:
    return tuple(part if part == "auto" else int(part) for part in text.split(",") if part.strip())


def _names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    chosen = parser.add_mutually_exclusive_group()
    for name in PROFILES:
        chosen.add_argument(f"--{name}", dest="profile", action="store_const", const=name, help=f"the {name} profile")
    parser.add_argument("--out", type=Path, help="output folder (default bench-out/<profile>)")
    parser.add_argument("--sizes", type=_ints, dest="accuracy_sizes", help="code scene sides, e.g. 1000,4000")
    parser.add_argument("--photo-sizes", type=_ints, dest="photo_sizes", help="photo scene sides")
    parser.add_argument("--speed-size", type=int, help="side of the scenes for the speed comparison")
    parser.add_argument("--memory-sizes", type=_ints, help="sides for the memory and message measurement")
    parser.add_argument("--workers", type=_ints, help="W values, e.g. 1,2 (default 1 and the number of cores)")
    parser.add_argument("--reps", type=int, help="repetitions of each speed variant")
    parser.add_argument("--batch-sizes", type=_batch_sizes, help="e.g. 1,2,4,8,16,auto")
    parser.add_argument("--recognizers", type=_names, help="e.g. qrcode,aruco,objects (unregistered ones are skipped)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument(
        "--rerender", type=Path, metavar="DIR", help="rewrite DIR's report and plots from its results.json"
    )
    parser.set_defaults(profile="quick")
    return parser.parse_args(argv)


def _model_dir() -> None:
    """Point the DNN recognizers at ../shared/models when the caller has not (workers inherit the environment), in
    this process too (the library reads no environment variable)."""
    from pipeline.recognizers.dnn import configure_models

    if not os.environ.get("TILEREC_MODEL_DIR"):
        shared = Path(__file__).resolve().parents[2] / "shared" / "models"
        if shared.is_dir():
            os.environ["TILEREC_MODEL_DIR"] = str(shared)
    configure_models(os.environ.get("TILEREC_MODEL_DIR", ""))


def usable_recognizers(wanted: tuple[str, ...], console: Console) -> list[str]:
    """The wanted recognizers that are registered and can be built here (a DNN without its model file is skipped)."""
    from pipeline.recognizers import available, get_recognizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        registered = {spec.name for spec in available()}
    usable = []
    for name in wanted:
        if name not in registered:
            console.log(f"[yellow]skipping {name}: not registered (pipeline.recognizers.available())")
            continue
        try:
            get_recognizer(name)
        except Exception as error:  # a missing model file: skip with the reason, do not fail the benchmark
            console.log(f"[yellow]skipping {name}: {error}")
            continue
        usable.append(name)
    return usable


def write(results: dict[str, Any], out: Path, plots_wanted: bool) -> dict[str, Any]:
    """Summary, plots, results.json and report.md from the raw results."""
    summary = analysis.summarize(results)
    results["summary"] = summary
    drawn = plots.draw_all(results, summary, out) if plots_wanted else {}
    results["plots"] = drawn
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "report.md").write_text(report.render(results, summary, drawn, results["command"]))
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(sys.argv[1:] if argv is None else argv)
    console = Console(stderr=True)
    if args.rerender:
        results = json.loads((args.rerender / "results.json").read_text())
        write(results, args.rerender, not args.no_plots)
        console.log(f"rewrote {args.rerender / 'report.md'}")
        return results
    _model_dir()
    overrides = {
        key: getattr(args, key)
        for key in (
            "accuracy_sizes",
            "photo_sizes",
            "speed_size",
            "memory_sizes",
            "workers",
            "reps",
            "batch_sizes",
            "recognizers",
            "seed",
        )
    }
    chosen = profile(args.profile, **overrides)
    out: Path = (args.out or Path("bench-out") / chosen.name).resolve()
    (out / "scenes").mkdir(parents=True, exist_ok=True)
    recognizers = usable_recognizers(chosen.recognizers, console)
    if not recognizers:
        raise SystemExit("no usable recognizer")
    env = {"TILEREC_ALLOWED_ROOTS": str(out / "scenes")}
    bench = Bench(chosen, out, console, recognizers, env)
    command = "python -m bench " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    results = run(bench)
    results["command"] = command
    summary = write(results, out, not args.no_plots)
    console.log(f"wrote {out / 'report.md'} and {out / 'results.json'} ({results['duration_s'] / 60:.1f} min)")
    for target in summary["targets"]:
        console.log(f"{report._met(target['met'])}: {target['target']} = {report._f(target['value'])}")
    return results


if __name__ == "__main__":
    main()
