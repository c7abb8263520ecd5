"""The `text` recognizer's second stage: each merged line read once from its full-resolution crop, the page put in
reading order (`pipeline.merge.lines`); and the recognizer's registration, its tile pass (`text.TextLines`) with
this stage."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pipeline.merge.lines import layout, page_text, word_count
from pipeline.model import Detections
from pipeline.recognizers import RecognizerSpec, register
from pipeline.recognizers.dnn import _bgr
from pipeline.recognizers.stages import Crop, SecondStage, StageResult, quad_of, rectify
from pipeline.recognizers.text import CLS_FILE, DET_FILE, REC_BATCH, REC_FILE, LineReader, TextLines, unreadable


class TextStage(SecondStage):
    """The `text` recognizer's second stage: each merged line read once from its full-resolution crop
    (`LineReader`), then the page put in reading order (`pipeline.merge.lines.layout`).

    `finish` gives each line its `text` (the result's detections, in reading order, turned so that each box's x axis
    is its reading direction), `text_score` (the recognizer's confidence), `column` and `block` data; it drops lines
    read as nothing or scoring under `text_score` (specks, pictures); a line too small or too tall to read keeps no
    text and says why in `unread`. The page's output: `text` in reading order, `words`, `lines`, `blocks`, `columns`
    and `angle` (the page's reading direction, degrees clockwise).
    """

    name = "text"
    cost_ms = 60.0  # one line of about 40 characters through the classifier and the recognizer, on one core
    max_batch = REC_BATCH
    pad = 2

    def __init__(self, params: dict[str, Any]) -> None:
        self.params = params
        self._reader: LineReader | None = None

    @property
    def reader(self) -> LineReader:
        if self._reader is None:
            p = self.params
            self._reader = LineReader(p["rec_model"], p["cls_model"], p["keys"], p["use_cls"])
        return self._reader

    def recognize(self, crops: list[Crop]) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = [{} for _ in crops]
        pictures, readable_rows = [], []
        for k, crop in enumerate(crops):
            why = unreadable(crop.detection.obb[0])
            if why is not None:
                records[k] = {"unread": why}
                continue
            pictures.append(rectify(_bgr(crop.pixels), quad_of(crop.detection)))
            readable_rows.append(k)
        for k, reading in zip(readable_rows, self.reader.read(pictures), strict=True):
            records[k] = {"text": reading.text, "score": round(reading.score, 5), "flipped": reading.flipped}
        return records

    def finish(
        self, detections: Detections, records: Sequence[Mapping[str, Any] | None], resources: Mapping[str, Any]
    ) -> StageResult:
        minimum = float(self.params["text_score"])
        kept = [i for i, r in enumerate(records) if r is None or "unread" in r
                or (str(r.get("text", "")).strip() and float(r.get("score", 0)) >= minimum)]  # fmt: skip
        lines = detections[kept]
        found = [records[i] for i in kept]
        obb = lines.obb.copy()
        flipped = np.array([bool(r and r.get("flipped")) for r in found], dtype=bool)
        obb[flipped, 4] = 180 - np.mod(180 - (obb[flipped, 4] + 180), 360)
        page = layout(obb)
        texts = [r.get("text") if r else None for r in found]
        order = page.order
        data = {
            "text_score": [r.get("score") if r else None for r in found],
            "column": page.column.tolist(),
            "block": page.block.tolist(),
            "unread": [r.get("unread") if r else None for r in found],
        }
        result = lines._with(obb=obb, texts=np.array(texts, dtype=object))
        result = result.with_data({key: values for key, values in data.items() if any(v is not None for v in values)})
        text = page_text(texts, page)
        output = {
            "text": text,
            "words": word_count(text),
            "lines": len(lines),
            "blocks": int(page.block.max()) + 1 if len(lines) else 0,
            "columns": int(page.column.max()) + 1 if len(lines) else 0,
            "angle": round(page.angle, 2),
            "dropped": len(detections) - len(kept),
        }
        return StageResult(result[order], output)


register(
    RecognizerSpec(
        "text",
        TextLines,
        {
            "det_model": "",
            "rec_model": "",
            "cls_model": "",
            "keys": "",
            "det_scale": 1.0,
            "det_threshold": 0.3,
            "box_threshold": 0.5,
            "unclip_ratio": 1.6,
            "text_score": 0.5,
            "use_cls": True,
        },
        f"text lines read by PP-OCR (ONNX Runtime; the rapidocr wheel's {DET_FILE}, {REC_FILE}, {CLS_FILE}): lines "
        "detected on tiles, joined across seams, each read once from the full-resolution crop",
        cost_ms=400,  # a 640x640 tile through the DB detector on one thread
        file_params=("det_model", "rec_model", "cls_model", "keys"),
        merge="lines",
        second_stage=TextStage,
    )
)
