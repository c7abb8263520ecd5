"""tilerec's own celeryconfig.py with the settings in TILEREC_BENCH_OVERRIDES (JSON) replaced: for the benchmark's
what-if workers only, which start with this folder as their working directory so `celeryconfig` resolves here.

It measures what a configuration change would buy before anyone makes it; tilerec's settings stay as they are.
"""

import importlib.util
import json
import os
from pathlib import Path

_REAL = Path(__file__).resolve().parents[2] / "celeryconfig.py"
_spec = importlib.util.spec_from_file_location("_tilerec_celeryconfig", _REAL)
assert _spec is not None and _spec.loader is not None
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)
globals().update({name: value for name, value in vars(_module).items() if not name.startswith("_")})
globals().update(json.loads(os.environ.get("TILEREC_BENCH_OVERRIDES", "{}")))
