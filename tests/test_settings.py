"""celeryconfig reads every setting from the environment; a value that is not a number where one is needed stops
whatever loads it (worker, Flower, a calling app) with the setting's name and what it accepts."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import redis


def _load(env: dict[str, str], code: str = "import celeryconfig") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True)


@pytest.mark.parametrize(
    ("name", "value", "accepts"),
    [
        ("TILEREC_TILE_TTL", "an hour", "a whole number of at least 1"),
        ("TILEREC_TILE_TTL", "0", "a whole number of at least 1"),
        ("TILEREC_MAX_PIXELS", "1.5e9", "a whole number of at least 0"),
        ("TILEREC_PREFETCH_MULTIPLIER", "-1", "a whole number of at least 0"),
        ("TILEREC_RESULT_INLINE_MAX_BYTES", "-2", "a whole number of at least -1"),
        ("TILEREC_BATCH_TARGET_MS", "fast", "a number of at least 1"),
        ("TILEREC_BATCH_TARGET_MS", "inf", "a number of at least 1"),
        ("TILEREC_MIN_BATCHES", "0", "'auto' or a whole number of at least 1"),
        ("TILEREC_MIN_BATCHES", "many", "'auto' or a whole number of at least 1"),
        ("TILEREC_STORE_MAX_BYTES", "200mb", "a whole number of at least 0"),
        ("TILEREC_REDIS_PATIENCE_S", "-5", "a number of at least 0"),
        ("TILEREC_STALL_S", "soon", "a number of at least 0"),
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


def test_redis_patience_becomes_the_retries_whose_backoff_adds_up_to_it():
    # sleeps 0.2, 0.4, 0.8, 1.6, then 2 s each: 3.0 s after 4 retries, 29.0 after 17, 31.0 after 18
    import celeryconfig

    assert [celeryconfig.backoff_retries(s) for s in (0, 0.2, 0.25, 3.0, 29.0, 30)] == [0, 1, 2, 4, 17, 18]
    shown = _load({"TILEREC_REDIS_PATIENCE_S": "120"},
                  "import celeryconfig as c; print(c.tilerec_redis_retries, c.result_backend_max_retries)")  # fmt: skip
    assert shown.stdout.split() == ["63", "123"], shown.stderr  # 3.0 s + 2 s × 59; twice that for Celery's jitter


def test_a_store_client_waits_its_retries_for_a_redis_that_is_not_there():
    from tasks import store
    from tasks.local import free_port

    port = free_port()
    client = store.connect(f"redis://127.0.0.1:{port}/0", retries=3)  # sleeps 0.2 + 0.4 + 0.8 s
    started = time.monotonic()
    with pytest.raises(redis.ConnectionError):
        client.ping()
    assert time.monotonic() - started >= 1.4
    impatient = store.connect(f"redis://127.0.0.1:{port}/1", retries=0)
    with pytest.raises(redis.ConnectionError):
        impatient.ping()


def test_the_broker_is_followed_by_the_backend_and_the_store_unless_they_are_set():
    shown = _load(
        {"TILEREC_BROKER_URL": "redis://broker:1/0", "TILEREC_RESULT_BACKEND": "", "TILEREC_STORE_URL": ""},
        "import celeryconfig as c; print(c.result_backend, c.tilerec_store_url, *c.backend_and_store('redis://b:2'))",
    )
    assert shown.stdout.split() == ["tasks.chords:RedisBackend+redis://broker:1/0", "redis://broker:1/0",
                                    "redis://b:2", "redis://b:2"], shown.stderr  # fmt: skip
    shown = _load(
        {"TILEREC_BROKER_URL": "redis://broker:1/0", "TILEREC_RESULT_BACKEND": "redis://backend:3/0"},
        "import celeryconfig as c; print(c.tilerec_store_url, *c.backend_and_store('redis://b:2'))",
    )
    assert shown.stdout.split() == ["redis://backend:3/0", "redis://backend:3/0", "redis://backend:3/0"]


def test_a_worker_gives_the_pipeline_its_plugin_modules_model_files_and_gdal_defaults(tmp_path):
    for name in ("yunet.onnx", "FastestDet.onnx"):
        (tmp_path / name).write_bytes(b"x")
    code = (
        "import os; from tasks.celery import _set_up_pipeline; _set_up_pipeline();"
        "from pipeline.recognizers import dnn, plugins;"
        "print(sorted(plugins.allowed_modules()));"
        "print(dnn.model_file('faces-dnn', 'model', '', 'TILEREC_YUNET_MODEL', dnn.YUNET_FILE));"
        "print(dnn.model_file('objects', 'model', '', 'TILEREC_OBJECTS_MODEL', dnn.OBJECTS_FILE));"
        "print(os.environ['GDAL_CACHEMAX'], os.environ['GDAL_DISABLE_READDIR_ON_OPEN'])"
    )
    env = {
        "TILEREC_PLUGIN_MODULES": " tests.faulty, tests.staged",
        "TILEREC_MODEL_DIR": str(tmp_path),
        "TILEREC_YUNET_MODEL": str(tmp_path / "yunet.onnx"),
        "TILEREC_OBJECTS_MODEL": "",
        "GDAL_CACHEMAX": "32",
    }
    shown = _load(env, code)  # fmt: skip
    assert shown.stdout.splitlines() == ["['tests.faulty', 'tests.staged']", str(tmp_path / "yunet.onnx"),
                                         str(tmp_path / "FastestDet.onnx"), "32 EMPTY_DIR"], shown.stderr  # fmt: skip


def test_the_cli_reads_its_environment_when_a_command_runs(monkeypatch, tmp_path):
    from pipeline.recognizers import plugins
    from tasks.cli.settings import environment, run_settings, set_up

    monkeypatch.setattr(plugins, "_allowed", plugins._allowed)  # this process's, restored after
    monkeypatch.setenv("TILEREC_BROKER_URL", "redis://cluster:1/0")
    monkeypatch.setenv("TILEREC_ALLOWED_ROOTS", os.pathsep.join([str(tmp_path), ""]))
    monkeypatch.setenv("TILEREC_PLUGIN_MODULES", "tests.faulty ,")
    set_up()
    assert plugins.allowed_modules() == {"tests.faulty"}
    assert environment().allowed_roots == (tmp_path.resolve(),)
    assert run_settings(argparse.Namespace(broker=None)).broker == "redis://cluster:1/0"
    assert run_settings(argparse.Namespace(broker="redis://given:2/0")).broker == "redis://given:2/0"
    monkeypatch.setenv("TILEREC_BROKER_URL", "")
    assert run_settings(argparse.Namespace(broker=None)).broker is None  # a private cluster


def test_the_pixel_limit_is_the_readers_unless_set_and_the_cli_checks_images_against_it(tmp_path):
    shown = _load({"TILEREC_MAX_PIXELS": ""}, "from tasks.celery import settings; print(settings().max_pixels)")
    assert shown.stdout == f"{40_000 * 40_000}\n", shown.stderr
    image = tmp_path / "wide.png"
    cv2.imwrite(str(image), np.zeros((10, 30), np.uint8))  # 300 pixels
    refused = subprocess.run([str(Path(sys.executable).parent / "tilerec"), "run", str(image), "-r", "qrcode"],
                             env={**os.environ, "TILEREC_MAX_PIXELS": "299", "TILEREC_BROKER_URL": ""},
                             capture_output=True, text=True)  # fmt: skip
    assert refused.returncode != 0
    assert "30x10" in refused.stderr.replace("×", "x") and "TILEREC_MAX_PIXELS" in refused.stderr, refused.stderr


def test_settings_are_read_from_the_environment_only_at_the_edge():
    root = Path(__file__).resolve().parents[1]
    edge = {root / "tasks" / "celery.py", root / "tasks" / "cli" / "settings.py"}
    sources = [*(root / "pipeline").rglob("*.py"), *(root / "tasks").rglob("*.py")]
    assert len(sources) > 40, "the packages were found"
    reading = re.compile(r"\bos\.(environ|getenv|putenv)\b|\bfrom os import (environ|getenv)\b")
    readers = sorted(str(path.relative_to(root)) for path in sources if path not in edge and
                     reading.search(path.read_text()))  # fmt: skip
    assert readers == [], "pipeline/ takes parameters; tasks/ reads settings in tasks.celery or tasks/cli/settings.py"
