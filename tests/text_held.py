"""The `text` recognizer whose second stage can be held at a known point, loaded by workers as
`tests.text_held:HELD_TEXT` (TILEREC_PLUGIN_MODULES): a test kills the process that holds it, mid-reading."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

from pipeline.recognizers import get_spec
from pipeline.recognizers.stages import Crop
from pipeline.recognizers.text_stage import TextStage

HOLD_S = 120.0  # the longest a held crop batch waits


class HeldReading(TextStage):
    """The text stage; while the file `hold` exists, a crop batch waits before reading, leaving `<hold>.<pid>` so
    the test knows which process to kill."""

    def __init__(self, params: dict[str, Any]) -> None:
        super().__init__(params)
        self.hold = str(params.get("hold") or "")

    def recognize(self, crops: list[Crop]) -> list[dict[str, Any]]:
        if self.hold and Path(self.hold).exists():
            Path(f"{self.hold}.{os.getpid()}").touch()
            deadline = time.monotonic() + HOLD_S
            while Path(self.hold).exists() and time.monotonic() < deadline:
                time.sleep(0.02)
        return super().recognize(crops)


def _detector(hold: str = "", **params: Any) -> Any:
    del hold  # the stage's
    return get_spec("text").factory(**params)


_text = get_spec("text")
HELD_TEXT = dataclasses.replace(_text, factory=_detector, params={**_text.params, "hold": ""},
                                second_stage=HeldReading)  # fmt: skip
