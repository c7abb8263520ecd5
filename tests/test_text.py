"""The `text` recognizer on generated pages with known strings and positions (rendered in DejaVu Sans), on the real
scans in ../shared/images/text, in process and on real workers; bad input and limits."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

import pipeline
from pipeline.inference import recognize_source
from pipeline.merge.lines import join_lines, layout
from pipeline.readers.sources import open_source
from pipeline.recognizers import RecognizerError, get_recognizer
from pipeline.recognizers.text import joined_pieces, lines_from_obb, piece_bounds, unreadable
from pipeline.scenes.text import (
    character_error_rate,
    column_page,
    duplicated_words,
    seam_page,
    turned,
    word_recall,
    words,
)
from tasks.client import submit
from tests.conftest import IMAGES_ROOT, once_per_run, tilerec_keys

TIMEOUT = 300
SCANS = Path(__file__).resolve().parents[2] / "shared" / "images" / "text"
# detection at half scale: the pages' 28 px text is 14 px there, as PP-OCR's detector likes it, at a quarter of the
# cost (the defaults are tested on the real scans)
FAST = {"det_scale": 0.5}


@pytest.fixture(scope="module")
def seams():
    return seam_page()


@pytest.fixture(scope="module")
def seams_read(seams, tmp_path_factory):
    return once_per_run(tmp_path_factory, "text-seams", lambda _: pipeline.recognize_image(seams.image, "text", **FAST))


def lines_of(document: dict) -> list[str]:
    return [d.get("text") for d in document["detections"]]


# -- pure parts


def test_long_lines_are_cut_between_letters_and_joined_back() -> None:
    profile = np.ones(1000)
    profile[300:320] = 0  # a blank run between words, within the last quarter of the first 400 px
    # pieces of at most 40 heights (400 px), each cut at the emptiest column of its last quarter (the first found)
    assert piece_bounds(profile, height=10) == [(0, 300), (300, 600), (600, 1000)]
    assert piece_bounds(np.ones(100), height=10) == [(0, 100)]
    assert joined_pieces(["the quick ", " brown"], [True]) == "the quick brown"
    assert joined_pieces(["jum", "ped over"], [False]) == "jumped over"


def test_a_line_too_small_or_too_tall_says_why() -> None:
    assert unreadable([50, 50, 200, 30, 0]) is None
    assert "too small" in unreadable([50, 50, 200, 3, 0])
    assert "too tall" in unreadable([50, 50, 9000, 2500, 0])


def test_models_by_path_are_checked_with_the_parameter_named(tmp_path: Path) -> None:
    with pytest.raises(RecognizerError, match=r"missing\.onnx \(from parameter 'det_model'\) does not exist"):
        get_recognizer("text", {"det_model": str(tmp_path / "missing.onnx")})
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(
        RecognizerError, match=r"'text': model file .*bad\.onnx \(parameter 'det_model'\) is not a usable"
    ):
        get_recognizer("text", {"det_model": str(bad)})
    with pytest.raises(RecognizerError, match=r"missing\.onnx \(from parameter 'rec_model'\) does not exist"):
        get_recognizer("text", {"rec_model": str(tmp_path / "missing.onnx")})
    with pytest.raises(RecognizerError, match="det_scale"):
        get_recognizer("text", {"det_scale": 0.0})


def test_finish_drops_what_reads_as_nothing_keeps_the_unreadable_and_turns_the_upside_down() -> None:
    from pipeline.recognizers import resolve_params
    from pipeline.recognizers.text_stage import TextStage

    boxes = np.array([[300, 100, 400, 30, 0], [300, 140, 400, 30, 0], [300, 180, 400, 3, 0], [300, 220, 400, 30, 0],
                      [300, 260, 400, 30, 0], [300, 300, 400, 30, 0]], dtype=np.float64)  # fmt: skip
    records = [
        {"text": "first line", "score": 0.99, "flipped": False},
        {"text": "  ", "score": 0.99, "flipped": False},  # nothing read
        {"unread": "too small to read (400x3 px; at least 4 px a side)"},
        {"text": "~:.", "score": 0.2, "flipped": False},  # below text_score: a speck
        None,  # its crop failed: kept, without text
        {"text": "upside down", "score": 0.95, "flipped": True},
    ]
    stage = TextStage(resolve_params("text"))
    result = stage.finish(lines_from_obb(boxes, np.full(6, 0.9)), records, {})
    kept = result.detections
    assert kept.texts.tolist() == ["first line", None, None, "upside down"]
    assert kept.data["unread"].tolist() == [None, records[2]["unread"], None, None]
    assert kept.obb[:, 4].tolist() == [0, 0, 0, 180]
    assert result.output["text"] == "first line\n\nupside down" and result.output["words"] == 4  # 3 heights apart
    assert result.output["dropped"] == 2


def test_ten_thousand_lines_join_and_order_in_a_flash_of_geometry() -> None:
    """The merge and the reading order of a page of 12,000 lines (4 columns of 3,000, each cut by a seam)."""
    boxes = []
    for column in range(4):
        x = 100 + column * 1300
        for row in range(3000):
            y = 100 + 40 * row
            boxes += [(x + 250, y, 500, 30, 0.0), (x + 700, y, 600, 30, 0.0)]  # pieces overlapping at x + 400..500
    joined = join_lines(lines_from_obb(np.array(boxes), np.full(len(boxes), 0.9)))
    assert len(joined) == 12000
    page = layout(joined.obb)
    x, y = joined.obb[page.order, 0], joined.obb[page.order, 1]
    assert (np.diff(page.column[page.order]) >= 0).all() and len(np.unique(page.column)) == 4
    assert (np.diff(y.reshape(4, 3000), axis=1) > 0).all() and (np.diff(x.reshape(4, 3000)[:, 0]) > 0).all()


# -- generated pages, in process


def test_lines_across_one_seam_two_seams_and_longer_than_three_tiles_are_read_once_and_whole(seams, seams_read):
    assert lines_of(seams_read.to_json()) == [line.text for line in seams.lines]
    long_line = seams_read.detections.obb[2]
    assert long_line[2] > 3 * 640  # one detection, read from one crop
    output = seams_read.second_stage.output
    assert output["text"].split() == seams.words and output["words"] == len(seams.words)
    assert output["lines"] == len(seams.lines) and seams_read.second_stage.failed_crops == []


def test_five_hundred_words_on_three_columns_are_all_found_once_in_reading_order() -> None:
    page = column_page(words(500, seed=7), columns=3, width=2400, size=28)
    found = pipeline.recognize_image(page.image, "text", **FAST).second_stage.output
    read = found["text"].split()
    assert word_recall(page.words, read) == 1.0
    assert duplicated_words(page.words, read) == 0
    assert read == page.words
    assert found["columns"] == 3


@pytest.mark.parametrize(("quarter_turns", "skew"), [(1, 0.0), (2, 0.0), (3, 0.0), (0, 3.0), (1, -2.0)])
def test_turned_and_skewed_pages_read(quarter_turns: int, skew: float) -> None:
    page = column_page(words(60, seed=quarter_turns), columns=2, width=1400, size=28)
    result = pipeline.recognize_image(turned(page, quarter_turns, skew), "text", **FAST)
    output = result.second_stage.output
    assert output["text"].split() == page.words
    expected = (90 * quarter_turns + skew + 180) % 360 - 180
    assert (output["angle"] - expected + 180) % 360 - 180 == pytest.approx(0, abs=1.5)


def test_an_empty_page_reads_nothing() -> None:
    result = pipeline.recognize_image(np.full((900, 1300), 255, np.uint8), "text", **FAST)
    assert len(result.detections) == 0
    assert result.second_stage.output == {"text": "", "words": 0, "lines": 0, "blocks": 0, "columns": 0,
                                          "angle": 0.0, "dropped": 0}  # fmt: skip


def test_sixteen_bit_and_one_bit_scans_read_like_eight_bit(tmp_path: Path) -> None:
    page = column_page(words(40, seed=11), columns=1, width=1200, size=28)
    deep = page.image.astype(np.uint16) * 257
    assert pipeline.recognize_image(deep, "text", **FAST).second_stage.output["text"].split() == page.words
    path = tmp_path / "bilevel.tif"
    tifffile.imwrite(path, page.image < 128, photometric="miniswhite")  # 1 bit per sample, set bits black
    source = open_source(path)
    try:
        result = recognize_source(source, "text", **FAST)
    finally:
        source.close()
    assert result.second_stage.output["text"].split() == page.words


# -- the real scans


@pytest.mark.parametrize(("name", "recall", "cer"), [("eurotext", 0.95, 0.02), ("phototest", 0.98, 0.01)])
def test_real_scans_read_above_a_floor(name: str, recall: float, cer: float) -> None:
    image = cv2.imread(str(SCANS / f"{name}.tif"), cv2.IMREAD_UNCHANGED)
    if image is None:
        pytest.skip(f"{SCANS} has no {name}.tif")
    truth = (SCANS / f"{name}.txt").read_text(encoding="utf-8")
    found = pipeline.recognize_image(image, "text").second_stage.output["text"]
    assert word_recall(truth.split(), found.split()) >= recall
    assert character_error_rate(truth, found) <= cer


# -- on workers


def test_on_workers_the_seam_page_reads_as_in_process_and_leaves_nothing(worker, redis_server, seams, seams_read):
    path = IMAGES_ROOT / "text-seams.png"
    cv2.imwrite(str(path), seams.image)
    result = submit(str(path), "text", batch_size=3, crop_batch_size=4, **FAST).get(timeout=TIMEOUT).to_json()
    assert lines_of(result) == [line.text for line in seams.lines]
    assert result["second_stage"]["output"] == seams_read.second_stage.output
    assert result["second_stage"]["batches"] > 1
    assert tilerec_keys(redis_server) == []


def test_the_cli_writes_the_text_and_hocr_of_two_pages(worker, redis_server, tmp_path: Path):
    from tests.test_cli import tilerec

    pages = [column_page(words(30, seed=seed), columns=2, width=1200, size=28) for seed in (21, 22)]
    paths = []
    for k, page in enumerate(pages):
        paths.append(IMAGES_ROOT / f"text-cli-{k}.png")
        cv2.imwrite(str(paths[-1]), page.image)
    common = ("-r", "text", "-p", "det_scale=0.5", "--broker", redis_server.url, "--quiet")
    text_out, hocr_out = tmp_path / "pages.txt", tmp_path / "pages.hocr"
    completed = tilerec("run", *map(str, paths), *common, "--format", "text", "--json", str(text_out), timeout=TIMEOUT)
    assert completed.returncode == 0, completed.stderr
    read = text_out.read_text(encoding="utf-8").split("\f")
    assert [part.split() for part in read] == [page.words for page in pages]
    completed = tilerec("run", str(paths[0]), *common, "--format", "hocr", "--json", str(hocr_out), timeout=TIMEOUT)
    assert completed.returncode == 0, completed.stderr
    import xml.etree.ElementTree as ElementTree

    root = ElementTree.fromstring(hocr_out.read_bytes())
    assert [e.text for e in root.iter() if e.get("class") == "ocrx_word"] == pages[0].words
    refused = tilerec("run", str(paths[0]), "-r", "text", "--format", "hocr")
    assert refused.returncode == 2 and "--format hocr needs --json OUT" in refused.stderr
    assert tilerec_keys(redis_server) == []
