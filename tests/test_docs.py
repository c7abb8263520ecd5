"""The manual builds as a site without a warning (a broken link, a missing page or image fails it), and its
front page, the README, stays a front page."""

from __future__ import annotations

import doctest
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_site_builds_strictly(tmp_path):
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    front = (tmp_path / "site" / "index.html").read_text()
    assert "tilerec recognizes objects in large images" in front
    assert 'href="architecture/"' in front, "the README's links into docs/ point within the site"
    api = (tmp_path / "site" / "api" / "index.html").read_text()  # the API reference, from the docstrings
    for documented in (
        "pipeline.recognize_image",
        "pipeline.model.Recognition",
        "pipeline.model.Detections",
        "pipeline.recognizers.Recognizer",
        "tasks.client.Job.get",
        "tasks.client.fetch_result",
    ):
        assert f'id="{documented}"' in api, documented
    assert "Returns:" in api and "Examples:" in api


def test_the_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 260, f"README.md has {len(lines)} lines; details belong in docs/"
    assert lines[0] == "# tilerec" and "tilerec recognizes objects" in lines[2]


@pytest.mark.parametrize("module", ["pipeline.model", "pipeline.recognizers"])
def test_the_api_references_examples_run(module):
    """The examples the API reference shows give what they say (the client's need a cluster: shown, not run)."""
    failed, attempted = doctest.testmod(importlib.import_module(module))
    assert attempted > 0 and failed == 0
