"""A recognizer whose second stage can be held at a known point: while the file named by its `hold` parameter
exists, a crop batch waits before its stage runs, leaving `<hold>.<pid>` so a test knows which process to kill."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

from pipeline.recognizers import RecognizerSpec, get_spec
from pipeline.recognizers.stages import Crop

HOLD_S = 120.0  # the longest a held crop batch waits


def held(name: str, stage: type) -> RecognizerSpec:
    """The registered recognizer `name` with a `hold` parameter that holds its second stage (`stage`'s class)."""

    class Held(stage):  # type: ignore[misc, valid-type]
        def __init__(self, params: Any) -> None:
            super().__init__(params)
            self.hold = str(params.get("hold") or "")

        def recognize(self, crops: list[Crop]) -> list[dict[str, Any]]:
            if self.hold and Path(self.hold).exists():
                Path(f"{self.hold}.{os.getpid()}").touch()
                deadline = time.monotonic() + HOLD_S
                while Path(self.hold).exists() and time.monotonic() < deadline:
                    time.sleep(0.02)
            return super().recognize(crops)

    def detector(hold: str = "", **params: Any) -> Any:
        del hold  # the stage's
        return get_spec(name).factory(**params)

    spec = get_spec(name)
    Held.__name__ = Held.__qualname__ = f"Held{stage.__name__}"
    return dataclasses.replace(spec, factory=detector, params={**spec.params, "hold": ""}, second_stage=Held)
