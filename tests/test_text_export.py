"""Plain text and hOCR of recognized lines (pipeline.outputs.export), on hand-made lines: structure, boxes, bad text."""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree

import numpy as np
import pytest

from pipeline.model import Detections, Recognition, Spatial
from pipeline.outputs.export import geojson_document, hocr_document, plain_text, word_quads, xml_safe

XHTML = "{http://www.w3.org/1999/xhtml}"


def page(
    texts: list[str | None], columns: list[int], blocks: list[int], obb: list[list[float]] | None = None
) -> Recognition:
    """A 1000x800 page of lines 400x30 px stacked 40 px apart, in the given order, with column and block data."""
    n = len(texts)
    boxes = obb or [[300.0 + 400 * c, 100.0 + 40 * k, 400.0, 30.0, 0.0] for k, c in enumerate(columns)]
    corners = np.array([[b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2] for b in boxes])
    detections = Detections(corners, np.full(n, 0.8), ["text"] * n, texts, obb=np.array(boxes),
                            data={"column": columns, "block": blocks, "text_score": [0.97] * n})  # fmt: skip
    return Recognition(1000, 800, detections, "text", source="scan.png")


def parsed(document: str) -> ElementTree.Element:
    return ElementTree.fromstring(document.encode("utf-8"))


def spans(root: ElementTree.Element, kind: str) -> list[ElementTree.Element]:
    return [e for e in root.iter() if e.get("class") == kind]


def test_plain_text_is_lines_in_order_with_blank_lines_between_blocks_and_pages() -> None:
    first = page(["Alpha beta", "gamma", "delta", None, "  epsilon\tzeta "], [0, 0, 0, 0, 1], [0, 0, 1, 1, 2])
    second = page(["second page"], [0], [0])
    assert plain_text([first]) == "Alpha beta\ngamma\n\ndelta\n\nepsilon zeta\n"
    assert plain_text([first, second]) == "Alpha beta\ngamma\n\ndelta\n\nepsilon zeta\n\fsecond page\n"
    assert plain_text([page([], [], [])]) == ""


def test_hocr_nests_page_areas_paragraphs_lines_and_words_with_boxes() -> None:
    root = parsed(hocr_document([page(["Alpha beta", "gamma", "delta", "eps"], [0, 0, 0, 1], [0, 0, 1, 2])]))
    assert [e.get("content") for e in root.iter(f"{XHTML}meta") if e.get("name") == "ocr-capabilities"] == [
        "ocr_page ocr_carea ocr_par ocr_line ocrx_word"
    ]
    (ocr_page,) = spans(root, "ocr_page")
    assert ocr_page.get("title") == 'image "scan.png"; bbox 0 0 1000 800; ppageno 0'
    areas = spans(ocr_page, "ocr_carea")
    assert [len(spans(a, "ocr_par")) for a in areas] == [2, 1]
    assert [len(spans(p, "ocr_line")) for p in spans(ocr_page, "ocr_par")] == [2, 1, 1]
    words = spans(ocr_page, "ocrx_word")
    assert [w.text for w in words] == ["Alpha", "beta", "gamma", "delta", "eps"]
    # "Alpha beta" fills x 100..500: Alpha its first 5 of 10 characters, beta the last 4
    assert words[0].get("title") == "bbox 100 85 300 115; x_wconf 97"
    assert words[1].get("title") == "bbox 340 85 500 115; x_wconf 97"
    assert spans(ocr_page, "ocr_line")[0].get("title") == "bbox 100 85 500 115; x_size 30.0"
    assert areas[1].get("title") == "bbox 500 205 900 235"
    ids = [e.get("id") for e in root.iter() if e.get("id")]
    assert len(ids) == len(set(ids))


def test_a_turned_line_has_its_text_angle_and_turned_word_boxes() -> None:
    root = parsed(hocr_document([page(["up the side"], [0], [0], obb=[[500.0, 400.0, 300.0, 30.0, -90.0]])]))
    (line,) = spans(root, "ocr_line")
    assert line.get("title") == "bbox 485 250 515 550; x_size 30.0; textangle 90.0"
    # read bottom to top: the first word is at the bottom
    first, last = (w.get("title") for w in spans(root, "ocrx_word")[::2])
    # "up" is characters 0-2 of 11 along 300 px from y = 550 up, "side" characters 7-11
    assert first.startswith("bbox 485 495 515 550") and last.startswith("bbox 485 250 515 360")


@pytest.mark.parametrize(
    "hostile",
    [
        '<script>alert("x")</script> & </span></p>',
        "]]><!-- --> &amp; &#0; <?xml?>",
        "nul\x00 bell\x07 escape\x1b formfeed\x0c",
        "lone \ud800 surrogates \udcff from bytes",
        "non-characters \ufffe \uffff",
        "bad bytes " + b"\xff\xfe\xc3".decode("utf-8", "surrogateescape"),
    ],
)
def test_hostile_text_stays_text_in_valid_hocr(hostile: str) -> None:
    recognition = page([hostile, "plain"], [0, 0], [0, 0])
    document = hocr_document([recognition], images=['a "quoted" <name>.png'])
    document.encode("utf-8")  # no surrogate left: it can be written
    root = parsed(document)  # well-formed XML
    words = [w.text for w in spans(root, "ocrx_word")]
    assert " ".join(words[:-1]) == xml_safe(" ".join(hostile.split()))
    assert words[-1] == "plain"
    assert not any(spans(root, "") or root.iter(f"{XHTML}script"))
    assert spans(root, "ocr_page")[0].get("title").startswith('image "a quoted <name>.png"')


def test_xml_safe_keeps_what_xml_can_hold() -> None:
    kept = "tab\t lf\n cr\r é ü 漢字 🙂 \u2028"
    assert xml_safe(kept) == kept
    assert xml_safe("a\x00b\ud800c\uffff") == "a\ufffdb\ufffdc\ufffd"


def test_word_quads_split_a_line_by_its_characters() -> None:
    quad = np.array([[0.0, 0.0], [100.0, 0.0], [100.0, 10.0], [0.0, 10.0]])
    found = word_quads("ab  cdef", quad)
    assert [w for w, _ in found] == ["ab", "cdef"]
    assert found[1][1][:, 0].tolist() == [50.0, 100.0, 100.0, 50.0]
    assert word_quads("   ", quad) == []


def test_lines_of_a_georeferenced_raster_are_geojson_polygons_with_their_text() -> None:
    recognition = page(["Main Street", "River"], [0, 1], [0, 1])
    recognition.spatial = Spatial(transform=(2.0, 0.0, 500000.0, 0.0, -2.0, 4000000.0), epsg=32633, crs="WKT")
    collection = geojson_document([recognition])
    first, second = collection["features"]
    assert [first["properties"]["text"], second["properties"]["text"]] == ["Main Street", "River"]
    # the first line: x 100..500, y 85..115 in pixels, 2 m a pixel from (500000, 4000000), y up
    xs, ys = zip(*first["geometry"]["coordinates"][0], strict=True)
    assert (min(xs), max(xs), min(ys), max(ys)) == (500200.0, 501000.0, 3999770.0, 3999830.0)
    assert collection["crs"]["properties"]["name"] == "urn:ogc:def:crs:EPSG::32633"
