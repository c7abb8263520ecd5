"""ONNX Runtime execution providers on the CPU wheel: the configured list is honoured, a provider this build lacks
(CUDA here) falls back to the CPU with one warning, or is refused when strict, and a worker node warns once in its
log and tells `tilerec recognizers --json` where its sessions run."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnxruntime
import pytest

from bench.batching import build, detector_model, tiles
from pipeline.recognizers import RecognizerError, dnn
from pipeline.recognizers.dnn import CPU_PROVIDER, configure_execution, current_execution
from tasks.local import Worker

CUDA = "CUDAExecutionProvider"
AVAILABLE = onnxruntime.get_available_providers()
FALLBACK = (
    f"ONNX Runtime execution provider(s) {CUDA} not in this onnxruntime build (available: {', '.join(AVAILABLE)})"
)
TIMEOUT = 120

lacks_cuda = pytest.mark.skipif(CUDA in AVAILABLE, reason="asks for a provider this onnxruntime lacks: CUDA")


@pytest.fixture(autouse=True)
def cpu_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts as a process that never configured its providers, and leaves none configured."""
    monkeypatch.setattr(dnn, "_execution", dnn.Execution())
    monkeypatch.setattr(dnn, "_told", set())


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return detector_model(tmp_path_factory.mktemp("models") / "v8.onnx")


def fallbacks(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == dnn.__name__ and r.levelno == logging.WARNING]


def test_workers_read_the_providers_the_device_and_strictness_from_the_environment():
    code = (
        "from tasks.celery import settings; s = settings(); print(s.onnx_providers, s.device, s.onnx_providers_strict)"
    )

    def shown(**env: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True)

    given = shown(
        TILEREC_ONNX_PROVIDERS=f" {CUDA}, {CPU_PROVIDER},", TILEREC_DEVICE="1", TILEREC_ONNX_PROVIDERS_STRICT="1"
    )
    assert given.stdout == f"('{CUDA}', '{CPU_PROVIDER}') 1 True\n", given.stderr
    defaults = shown(TILEREC_ONNX_PROVIDERS="", TILEREC_DEVICE="", TILEREC_ONNX_PROVIDERS_STRICT="")
    assert defaults.stdout == f"('{CPU_PROVIDER}',) 0 False\n", defaults.stderr
    refused = shown(TILEREC_DEVICE="-1")
    assert "ValueError: TILEREC_DEVICE must be a whole number of at least 0, got '-1'" in refused.stderr


def test_sessions_run_on_the_cpu_until_configured_then_on_the_providers_asked_for(model):
    assert build(model, 1).session.get_providers() == [CPU_PROVIDER]
    reference = build(model, 1)(tiles(1)[0])
    others = [name for name in AVAILABLE if name != CPU_PROVIDER]  # the CPU wheel: AzureExecutionProvider
    for name in others:
        execution = configure_execution([name, CPU_PROVIDER])
        assert (execution.used, execution.missing) == ((name, CPU_PROVIDER), ())
        detector = build(model, 1)
        assert detector.session.get_providers() == [name, CPU_PROVIDER], "the list honoured, in its order"
        np.testing.assert_allclose(detector(tiles(1)[0]).xyxy, reference.xyxy, atol=1e-4)
    configure_execution([" CPUExecutionProvider ", ""])
    assert current_execution().requested == (CPU_PROVIDER,), "spaces and empty items of a comma list dropped"


@lacks_cuda
def test_a_provider_this_build_lacks_falls_back_to_the_cpu_with_one_warning(model, caplog):
    with caplog.at_level(logging.WARNING, logger=dnn.__name__):
        execution = configure_execution([CUDA, CPU_PROVIDER], device=1)
        assert (execution.missing, execution.used) == ((CUDA,), (CPU_PROVIDER,))
        sessions = [build(model, batch).session for batch in (1, 8)]
    assert fallbacks(caplog) == [f"{FALLBACK}: sessions use {CPU_PROVIDER} instead"], "one warning, not one a session"
    assert all(session.get_providers() == [CPU_PROVIDER] for session in sessions)
    assert configure_execution([CUDA]).used == (CPU_PROVIDER,), "nothing left: the CPU's"


@lacks_cuda
def test_strict_providers_refuse_naming_the_missing_one_and_the_available_ones(model, caplog):
    with caplog.at_level(logging.WARNING, logger=dnn.__name__):
        configure_execution([CUDA, CPU_PROVIDER], strict=True)
        with pytest.raises(RecognizerError) as refused:
            build(model, 1)
    assert str(refused.value) == (
        f"recognizer 'objects': {FALLBACK}, and strict providers (TILEREC_ONNX_PROVIDERS_STRICT) do not fall back"
    )
    assert fallbacks(caplog) == [], "a refusal, not a warning"


@lacks_cuda
def test_a_provider_the_build_has_but_cannot_start_is_told_once_or_refused(model, caplog, monkeypatch):
    """onnxruntime-gpu on a machine without CUDA's libraries or a GPU: listed as available, left out by the session
    (made here by claiming CUDA is available; ORT itself then leaves it out)."""
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [CUDA, *AVAILABLE])
    with caplog.at_level(logging.WARNING, logger=dnn.__name__), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # ORT's own note that it has no CUDA
        execution = configure_execution([CUDA, CPU_PROVIDER], device=1)
        assert execution.providers() == [(CUDA, {"device_id": 1}), CPU_PROVIDER], "the device goes to CUDA only"
        assert fallbacks(caplog) == []
        for _ in range(2):
            assert build(model, 1).session.get_providers() == [CPU_PROVIDER]
        available = ", ".join([CUDA, *AVAILABLE])
        told = f"ONNX Runtime execution provider(s) {CUDA} could not start (available: {available})"
        assert fallbacks(caplog) == [f"{told}: sessions use {CPU_PROVIDER} instead"]
        configure_execution([CUDA, CPU_PROVIDER], strict=True)
        with pytest.raises(RecognizerError, match=rf"could not start \(available: {available}\), and strict"):
            build(model, 1)


@lacks_cuda
@pytest.mark.cluster
def test_a_worker_warns_once_for_the_node_and_tells_the_cli_where_it_runs(
    app, redis_server, images_root, model, tmp_path
):
    """Two processes recognize tiles on a worker asking for CUDA: one warning in its log, from the main process;
    `tilerec recognizers --json` lists the worker's providers next to this machine's."""
    import cv2

    env = {
        "TILEREC_RESULT_BACKEND": redis_server.url,
        "TILEREC_ALLOWED_ROOTS": str(images_root),
        "TILEREC_MODEL_ROOTS": str(Path(model).parent),
        "TILEREC_ONNX_PROVIDERS": f"{CUDA},{CPU_PROVIDER}",
        # queues of its own: it takes no other test's tasks, and no other worker takes this job's
        "TILEREC_JOBS_QUEUE": "providers.jobs",
        "TILEREC_TILES_QUEUE": "providers.tiles",
        "TILEREC_DEFAULT_QUEUE": "",
    }
    log = tmp_path / "worker.log"
    path = images_root / "providers.png"
    cv2.imwrite(str(path), tiles(1, 2000, 1500, seed=3)[0])
    with Worker(redis_server.url, concurrency=2, env=env, log_file=str(log)) as worker:
        options = {"model": model, "score_threshold": 0.5, "batch_size": 2}  # 12 tiles, 6 batches: both processes
        job = app.send_task("tilerec.recognize", [str(path), "objects"], options, queue="providers.jobs", priority=4)
        result = job.get(timeout=TIMEOUT)
        cli_env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("TILEREC_")},
            "TILEREC_BROKER_URL": redis_server.url,
            "TILEREC_ONNX_PROVIDERS": f"{CPU_PROVIDER}",
        }
        listed = subprocess.run(
            [sys.executable, "-m", "tasks.cli", "recognizers", "--json"],
            env=cli_env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert result["failed_tiles"] == [] and len(result["detections"]) > 0
    logged = log.read_text()
    ran = set(re.findall(r"/(ForkPoolWorker-\d+)\] Task tilerec.recognize_tiles", logged))
    assert len(ran) == 2, "both processes built a session and recognized tiles"
    lines = [line for line in logged.splitlines() if FALLBACK in line]
    assert len(lines) == 1 and "MainProcess" in lines[0], lines
    assert listed.returncode == 0, listed.stderr
    [objects] = [entry for entry in json.loads(listed.stdout) if entry["name"] == "objects"]
    execution = objects["execution"]
    assert execution["local"] == {
        "available": AVAILABLE, "configured": [CPU_PROVIDER], "used": [CPU_PROVIDER], "device": 0, "strict": False,
    }  # fmt: skip
    assert execution["workers"][worker.hostname] == {**execution["local"], "configured": [CUDA, CPU_PROVIDER]}


def test_the_compose_gpu_worker_takes_only_tiles_with_one_process_on_one_gpu():
    """docker-compose.yml's gpu-worker, read as Compose reads it, its command parsed by celery's own parser (the rest
    of the file: tests/test_compose.py)."""
    from tests.test_compose import SECRETS, celery_context, compose, tilerec_worker

    services = compose()["services"]
    gpu, cpu = services["gpu-worker"], services["worker"]
    assert gpu["profiles"] == ["gpu"], "only with `docker compose --profile gpu`"
    params = tilerec_worker(gpu["command"]).params
    assert (params["queues"], params["concurrency"]) == (["tilerec.tiles"], 1), "batch tasks only, one process"
    own = {"TILEREC_ONNX_PROVIDERS": f"{CUDA},{CPU_PROVIDER}", "TILEREC_DEVICE": "0"}
    assert gpu["environment"] == {**cpu["environment"], **own}, "the cluster's settings, and CUDA on its one device"
    assert gpu["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "device_ids": ["0"], "capabilities": ["gpu"]}
    ]
    assert (gpu["volumes"], gpu["depends_on"], gpu["restart"]) == (cpu["volumes"], cpu["depends_on"], cpu["restart"])
    [_, check] = gpu["healthcheck"]["test"]
    ping = celery_context([word for word in check.split() if not word.startswith(">")][1:])
    assert ping.params["destination"] == ["gpu-worker@$HOSTNAME"] and params["hostname"].startswith("gpu-worker@")
    build_steps = gpu["build"]["dockerfile_inline"]
    assert gpu["build"]["additional_contexts"] == {"tilerec": "service:worker"} and build_steps.startswith(
        "FROM tilerec"
    )
    assert build_steps.index("pip uninstall -y onnxruntime") < build_steps.index('pip install "onnxruntime-gpu')

    moved = compose({**SECRETS, "GPU_DEVICE": "1", "TILEREC_TILES_QUEUE": "acme.gpu"})["services"]["gpu-worker"]
    assert moved["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == ["1"]
    assert tilerec_worker(moved["command"]).params["queues"] == ["acme.gpu"]


def test_the_device_script_runs_end_to_end_dry_on_the_cpu_and_says_why_it_cannot_measure_cuda():
    import subprocess
    import sys

    import onnxruntime

    dry = [sys.executable, "-m", "bench.device", "--dry-run", "--tiles", "4", "--repeats", "1", "--batches", "1,2"]
    done = subprocess.run(dry, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [row.split("|")[1].strip() for row in rows] == ["1", "2"] and "dry run" in done.stdout
    assert all(float(row.split("|")[2]) > 0 for row in rows)
    real = subprocess.run([*dry[:3], "--tiles", "4"], capture_output=True, text=True, timeout=300)
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        assert real.returncode == 1 and "has no CUDAExecutionProvider" in real.stderr
