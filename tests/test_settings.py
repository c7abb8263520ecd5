"""celeryconfig reads every setting from the environment; a value that is not a number where one is needed stops
whatever loads it (worker, Flower, a calling app) with the setting's name and what it accepts."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def _load(env: dict[str, str], code: str = "import celeryconfig") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True)


@pytest.mark.parametrize(
    ("name", "value", "accepts"),
    [
        ("TILEREC_TILE_TTL", "an hour", "a whole number of at least 1"),
        ("TILEREC_TILE_TTL", "0", "a whole number of at least 1"),
        ("TILEREC_MAX_PIXELS", "1.5e9", "a whole number of at least 1"),
        ("TILEREC_PREFETCH_MULTIPLIER", "-1", "a whole number of at least 0"),
        ("TILEREC_RESULT_INLINE_MAX_BYTES", "-2", "a whole number of at least -1"),
        ("TILEREC_BATCH_TARGET_MS", "fast", "a number of at least 1"),
        ("TILEREC_BATCH_TARGET_MS", "inf", "a number of at least 1"),
        ("TILEREC_MIN_BATCHES", "0", "'auto' or a whole number of at least 1"),
        ("TILEREC_MIN_BATCHES", "many", "'auto' or a whole number of at least 1"),
        ("TILEREC_STORE_MAX_BYTES", "200mb", "a whole number of at least 0"),
    ],
)
def test_a_bad_number_stops_the_loading_with_the_setting_and_what_it_accepts(name, value, accepts):
    loaded = _load({name: value})
    assert loaded.returncode != 0
    assert f"ValueError: {name} must be {accepts}, got '{value}'" in loaded.stderr


def test_numbers_come_from_the_environment_or_their_defaults():
    shown = _load(
        {"TILEREC_TILE_TTL": " 120 ", "TILEREC_BATCH_TARGET_MS": "250.5", "TILEREC_PREFETCH_MULTIPLIER": ""},
        "import celeryconfig as c; print(c.tilerec_tile_ttl, c.tilerec_batch_target_ms, c.worker_prefetch_multiplier,"
        " c.tilerec_min_batches)",
    )
    assert shown.stdout == "120 250.5 1 None\n", shown.stderr
    given = _load({"TILEREC_MIN_BATCHES": " 12 "}, "import celeryconfig as c; print(c.tilerec_min_batches)")
    assert given.stdout == "12\n"
