"""Shared scene checks for the tests: expected values come from the scene's ground truth."""

from __future__ import annotations

from typing import Any

from pipeline.scenes.codes import Truth


def assert_each_code_once(detections: list[dict[str, Any]], truths: list[Truth], tolerance: float = 3.0) -> None:
    """Every known payload reported exactly once, nothing else, each box within `tolerance` px of the truth."""
    texts = sorted(d.get("text") for d in detections)
    assert texts == sorted(t.text for t in truths), "each code exactly once, and no other detection"
    by_text = {d["text"]: d for d in detections}
    for truth in truths:
        box = by_text[truth.text]["box"]
        assert max(abs(a - b) for a, b in zip(box, truth.box, strict=True)) <= tolerance, (truth, box)
