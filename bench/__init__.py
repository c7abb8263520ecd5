"""tilerec's benchmark: what distributing a recognition over worker processes buys, against the same recognizer run
whole-image and tiled in one process (what SAHI does), on seeded scenes with ground truth.

`python -m bench --quick` (a couple of minutes) or `python -m bench --full` (docs/performance.md's figures)
writes `report.md`, `results.json` (every raw figure) and PNG plots into `--out` (default `bench-out/<profile>`).

Benchmarks live here, not in the test suite: a timing is not a pass/fail test. `tests/test_bench_smoke.py` runs a
tiny profile so this code keeps working.
"""
