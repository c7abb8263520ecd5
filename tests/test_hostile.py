"""Hostile content: payloads decoded from images (markup, script, rich markup, ANSI escapes, carriage returns and
bells, bidirectional overrides, a long payload; labels too, through tests.faulty:PayloadLabels) and a hostile file
name go through a real worker and every output. They are stored faithfully in the JSON (tilerec's, COCO, GeoJSON)
and escaped everywhere else: the terminal (table, progress bars, plain lines, error lines), the annotated image,
the viewer and Flower in a real headless Chromium (nothing executes, nothing is injected into the page).
Undecodable bytes (invalid UTF-8, kept by Python as lone surrogates) cannot be put in a QR code by OpenCV's
encoder, so a result holding them is made directly and sent through every output."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest

from pipeline.model import Detections, Recognition
from pipeline.outputs.export import coco_document, geojson_document
from pipeline.outputs.render import caption, draw_detections
from pipeline.scenes.codes import qr_code
from tasks.cli.errors import markup_safe, printable
from tests.conftest import IMAGES_ROOT
from tests.test_flower import PASSWORD, USER, flower  # noqa: F401 (Flower watching the session's worker)
from tests.test_viewer import browser, chromium, open_page, serving  # noqa: F401 (the headless Chromium)

TIMEOUT = 120
PAYLOADS = [
    '<img src=x onerror="window.pwned=1">',
    "</script><script>window.pwned=2</script>",
    "[bold red]boom[/] [link=https://example.invalid]click[/link]",
    "\x1b[2J\x1b[31mred\x1b[0m",
    "over\rwrite\x08\x07bell\tTAB\nnew line",
    "caf\u00e9 \u202eevil",
    '{"json": "\\u0000", "quote": "\\""}',
    "long " + "A" * 1200,
]
UNDECODABLE = "caf\udce9 \udcff\udcfe bytes"  # b"caf\xe9 \xff\xfe bytes" as Python keeps it (surrogateescape)
NAME = "evil \x1b[31m[bold]name\r\u202e.png"  # a file name is the caller's, or a dataset's
RAW = ("\x1b[2J", "\x1b[31mred", "\rwrite", "\x07", "\x08", "\u202e", "\udcff")  # what must never reach a terminal
PLACES = [(40, 40)] + [(x, y) for y in (100, 700) for x in (700, 1000, 1300, 1600)]  # the long one fits a tile


@pytest.fixture(scope="module")
def hostile(flower, tmp_path_factory):  # noqa: F811 (the fixture)
    """The payloads as QR codes at known places, in a file with a hostile name, run by `tilerec run` on the
    session's cluster while Flower watches: with its bars and table (a terminal, FORCE_COLOR), and without."""
    image = np.full((1300, 1900), 235, np.uint8)
    for text, (x, y) in zip(PAYLOADS, PLACES, strict=False):
        picture, _ = qr_code(text, 3)
        image[y : y + picture.shape[0], x : x + picture.shape[1]] = picture
    path = IMAGES_ROOT / NAME
    path.write_bytes(cv2.imencode(".png", image)[1].tobytes())
    folder = tmp_path_factory.mktemp("hostile")
    from tasks.celery import app

    url = app.conf.broker_url
    env = {**os.environ, "TILEREC_RESULT_BACKEND": url, "TILEREC_PLUGIN_MODULES": "tests.faulty", "COLUMNS": "160"}
    runs = {}
    for mode, extra in (("terminal", {"FORCE_COLOR": "1"}), ("plain", {})):
        command = [sys.executable, "-m", "tasks.cli", "run", str(path), "-r", "tests.faulty:PayloadLabels",
                   "--broker", url, "--shared-path", "--json", str(folder / f"{mode}.json"),
                   "--annotate", str(folder / f"{mode}-annotated.png")]  # fmt: skip
        runs[mode] = subprocess.run(command, env={**env, **extra}, capture_output=True, text=True, timeout=TIMEOUT)
        assert runs[mode].returncode == 0, runs[mode].stderr[-3000:]
    return path, folder, runs


def test_the_json_holds_every_payload_and_label_faithfully(hostile):
    _, folder, _ = hostile
    result = json.loads((folder / "plain.json").read_text())
    assert sorted(d["text"] for d in result["detections"]) == sorted(PAYLOADS)
    assert sorted(d["label"] for d in result["detections"]) == sorted(PAYLOADS)
    assert result["image"]["source"].endswith(NAME)


def test_the_terminal_shows_everything_escaped(hostile):
    _, _, runs = hostile
    for mode, run in runs.items():
        shown = run.stderr
        assert not [raw for raw in RAW if raw in shown], (mode, shown[-3000:])
        assert "\\x1b[31m[bold]name\\r\\u202e.png" in shown or "\\u202e.png" in shown, (mode, shown[-3000:])
    # rich's markup is shown, not obeyed: the table's label column has the brackets as they are
    assert "[bold red]boom[/]" in runs["terminal"].stderr
    assert "\x1b[" in runs["terminal"].stderr  # rich's own colours: it did draw for a terminal


def test_an_error_line_escapes_the_name_it_names(tmp_path):
    bad = tmp_path / "not an image \x1b[2J\r.png"
    bad.write_bytes(b"\x1b[2J not a PNG")
    run = subprocess.run([sys.executable, "-m", "tasks.cli", "run", str(bad), "-r", "qrcode", "--broker",
                          "redis://127.0.0.1:1/0"], capture_output=True, text=True, timeout=TIMEOUT)  # fmt: skip
    lines = run.stderr.splitlines()
    assert run.returncode == 2 and len(lines) == 1 and lines[0].startswith("tilerec: error: "), run.stderr
    assert "\\x1b[2J\\r.png" in lines[0] and not [raw for raw in RAW if raw in lines[0]]


def test_printable_and_markup_safe_escape_what_a_terminal_would_act_on():
    assert printable("a\x1b[31mb\rc\x07\u202ed\udcffe\u00e9") == "a\\x1b[31mb\\rc\\x07\\u202ed\\udcffe\u00e9"
    assert markup_safe("[bold]x\x1b") == "\\[bold]x\\x1b"
    assert printable("plain text, café") == "plain text, café"


def test_captions_on_annotated_images_are_printable_ascii_and_short():
    for text in [*PAYLOADS, UNDECODABLE]:
        words = caption(text, 0.5, text)
        assert all(32 <= ord(c) < 127 for c in words) and len(words) < 2 * 32 + 8, repr(words)


def undecodable_recognition() -> Recognition:
    detections = Detections(np.array([[10.0, 10, 60, 60], [100, 10, 150, 60]]), np.array([0.9, 0.8]),
                            [UNDECODABLE, PAYLOADS[0]], [UNDECODABLE, PAYLOADS[3]])  # fmt: skip
    return Recognition(200, 100, detections, "tests.faulty:PayloadLabels", source="undecodable.png")


def test_undecodable_bytes_go_through_every_json_output_and_the_picture(tmp_path):
    recognition = undecodable_recognition()
    document = json.loads(json.dumps(recognition.to_json()))
    assert [d["text"] for d in document["detections"]] == [UNDECODABLE, PAYLOADS[3]]
    coco = json.loads(json.dumps(coco_document([recognition], ["undecodable.png"])))
    assert sorted(c["name"] for c in coco["categories"]) == sorted([UNDECODABLE, PAYLOADS[0]])
    assert sorted(a["text"] for a in coco["annotations"]) == sorted([UNDECODABLE, PAYLOADS[3]])
    geo = json.loads(json.dumps(geojson_document([recognition], ["undecodable.png"])))
    assert sorted(f["properties"]["text"] for f in geo["features"]) == sorted([UNDECODABLE, PAYLOADS[3]])
    canvas = draw_detections(np.full((100, 200), 255, np.uint8), recognition.detections)
    assert canvas.shape[:2] == (100, 200)
    assert printable(UNDECODABLE).encode("utf-8")  # a UTF-8 terminal takes it


def test_the_coco_and_geojson_documents_hold_the_payloads(hostile):
    _, folder, _ = hostile
    recognition = Recognition.from_json(json.loads((folder / "plain.json").read_text()))
    coco = json.loads(json.dumps(coco_document([recognition], [NAME])))
    assert sorted(a["text"] for a in coco["annotations"]) == sorted(PAYLOADS)
    assert sorted(c["name"] for c in coco["categories"]) == sorted(PAYLOADS)
    assert coco["images"][0]["file_name"] == NAME
    geo = json.loads(json.dumps(geojson_document([recognition], [NAME])))
    assert sorted(f["properties"]["text"] for f in geo["features"]) == sorted(PAYLOADS)


def test_annotated_images_were_drawn(hostile):
    _, folder, _ = hostile
    for mode in ("terminal", "plain"):
        drawn = cv2.imread(str(folder / f"{mode}-annotated.png"))
        assert drawn is not None and drawn.shape[:2] == (1300, 1900)


INJECTED = """return {
  pwned: window.pwned === undefined ? null : window.pwned,
  images: [...document.images].filter(i => i.getAttribute('src') === 'x').length,
  scripts: [...document.scripts].filter(s => s.textContent.includes('pwned')).length,
  text: document.body.innerText.toWellFormed(),  // lone surrogates (undecodable bytes) as U+FFFD
}"""


LISTED = "return [...document.querySelectorAll('#list li')].map(li => li.textContent.toWellFormed())"


def test_the_viewer_shows_the_payloads_as_text_and_runs_none(hostile, browser, tmp_path):  # noqa: F811
    path, folder, _ = hostile
    result = json.loads((folder / "plain.json").read_text())
    result["detections"].append({**result["detections"][0], "text": UNDECODABLE, "label": UNDECODABLE})
    (tmp_path / "result.json").write_text(json.dumps(result))
    with serving(tmp_path / "result.json", "--image", str(path)) as (url, _):
        open_page(browser, url)
        seen = browser.execute_script(INJECTED)
        listed = browser.execute_script(LISTED)
    assert seen["pwned"] is None and seen["images"] == 0 and seen["scripts"] == 0, seen
    for text in PAYLOADS[:3]:
        assert any(text in item for item in listed), (text, listed)
    assert NAME.split("\x1b")[0] in seen["text"]


def test_flower_shows_the_rows_as_text_and_runs_none(hostile, flower, browser):  # noqa: F811
    """The task list, and the job's own page with its arguments (the hostile name) and result (the payloads)."""
    jobs = [
        uuid
        for uuid, task in flower.json("/api/tasks").items()
        if task["name"] == "tilerec.merge" and "PayloadLabels" in (task["kwargs"] or "") + (task["args"] or "")
    ]
    assert len(jobs) == 2, "the two runs' jobs"  # fmt: skip
    credentials = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Basic {credentials}"}})
    try:
        browser.get(flower.url + "/tasks")
        for _ in range(100):  # Flower fills its table from its API once the page has loaded
            listed = browser.execute_script(INJECTED)
            if jobs[0] in listed["text"]:
                break
            time.sleep(0.2)
        browser.get(flower.url + f"/task/{jobs[0]}")
        page = browser.execute_script(INJECTED)
    finally:
        browser.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {}})
    assert jobs[0] in listed["text"], listed["text"][-2000:]
    for seen in (listed, page):
        assert seen["pwned"] is None and seen["images"] == 0 and seen["scripts"] == 0, seen
    assert "PayloadLabels" in page["text"] and "evil" in page["text"], page["text"][-3000:]
    assert '<img src=x onerror="window.pwned=1">' in page["text"], page["text"][-3000:]
