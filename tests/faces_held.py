"""faces-dnn whose identities stage can be held at a known point, loaded by workers as `tests.faces_held:HELD_FACES`
(TILEREC_PLUGIN_MODULES): a test kills the process that holds it, mid-embedding."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.recognizers import get_spec
from pipeline.recognizers.faces import FaceIdentities
from pipeline.recognizers.stages import Crop

HOLD_S = 120.0  # the longest a held crop batch waits


class HeldIdentities(FaceIdentities):
    """The identities stage; while the file `hold` exists, a crop batch waits before embedding, leaving
    `<hold>.<pid>` so the test knows which process to kill."""

    def __init__(self, params: Mapping[str, Any]) -> None:
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
    return get_spec("faces-dnn").factory(**params)


_faces = get_spec("faces-dnn")
HELD_FACES = dataclasses.replace(_faces, factory=_detector, params={**_faces.params, "hold": ""},
                                 second_stage=HeldIdentities)  # fmt: skip
