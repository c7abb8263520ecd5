"""Real parts only: a redis-server on a free local port and real `celery worker` processes, per test session."""

from __future__ import annotations

import fcntl
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import cv2
import pytest
from celery import Celery

from pipeline import recognizers
from pipeline.recognizers import RecognizerSpec, plugins
from pipeline.recognizers.dnn import configure_models
from tasks.local import RedisServer, Worker

T = TypeVar("T")
IMAGES_ROOT = Path(tempfile.mkdtemp(prefix="tilerec-images-"))
os.environ["TILEREC_ALLOWED_ROOTS"] = str(IMAGES_ROOT)
# the workers open model files named in jobs only under TILEREC_MODEL_DIR: the shared models beside the repo
os.environ.setdefault("TILEREC_MODEL_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "models"))
# and this process's recognizers find them there too, as a worker's do (tasks.celery configures its own)
configure_models(os.environ["TILEREC_MODEL_DIR"])


# fixtures that start processes (Redis, Celery workers, Flower, SeaweedFS, Chromium, the bench): a test using one
# of them, directly or through another fixture, is a `cluster` test
CLUSTER_FIXTURES = {"redis_server", "app", "worker", "two_nodes", "other_node", "other_app", "flower", "s3",
                    "s3_worker", "small_view", "browser", "smoke"}  # fmt: skip


def pytest_configure(config: pytest.Config) -> None:
    """Test processes × native threads = cores, as in the workers (tasks.celery): two test processes (`-n 2`) each
    giving OpenCV and ONNX Runtime every core would spin against each other (about a third more CPU for the same
    recognition)."""
    from pipeline.recognizers import limit_threads

    processes = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    limit_threads(max(1, (os.cpu_count() or 1) // processes))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark `cluster` every test that uses a fixture starting processes; tests that start their own are marked
    where they are written. `pytest -m "not cluster"` runs the rest: the edit-test loop's fast subset.

    Then the modules with cluster tests run first and those without last, each module's tests together and in
    order: under `-n 2` the processes take the tests left a few at a time, so the run ends on short tests and the
    two processes end together, rather than one waiting for the other's last fault test."""
    for item in items:
        if CLUSTER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.cluster)
    with_cluster = {item.path for item in items if item.get_closest_marker("cluster")}
    items.sort(key=lambda item: item.path not in with_cluster)  # stable: the order within each group is kept


@pytest.fixture(autouse=True)
def registry(monkeypatch: pytest.MonkeyPatch) -> dict[str, RecognizerSpec]:
    """A copy of the recognizer registry for each test: what a test registers or loads (`tests.staged:DarkBlobs`,
    a plugin) is gone after it, so a later test in the same process (listing the recognizers) does not see it."""
    monkeypatch.setattr(recognizers, "_REGISTRY", dict(recognizers._REGISTRY))
    return recognizers._REGISTRY


@pytest.fixture
def allow_modules() -> Iterator[Callable[[Iterable[str]], None]]:
    """`plugins.allow_modules` for this process, for one test (a worker's are its TILEREC_PLUGIN_MODULES)."""
    previous = plugins.allowed_modules()
    yield plugins.allow_modules
    plugins.allow_modules(previous)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def app(redis_server: RedisServer):
    """tilerec's Celery app, pointed at the test Redis (broker, result backend and tile store)."""
    from tasks.celery import app as celery_app
    from tasks.celery import configure

    url = redis_server.url
    configure(broker_url=url, result_backend=url, tilerec_store_url=url, tilerec_allowed_roots=str(IMAGES_ROOT))
    return celery_app


@pytest.fixture(scope="session")
def worker(app, redis_server: RedisServer, tmp_path_factory) -> Iterator[Worker]:
    log = tmp_path_factory.mktemp("logs") / "worker.log"
    env = {
        "TILEREC_RESULT_BACKEND": redis_server.url,
        "TILEREC_ALLOWED_ROOTS": str(IMAGES_ROOT),
        # recognizers that fail on purpose; shape producers; ones with a second stage (some held at a known point)
        "TILEREC_PLUGIN_MODULES": "tests.faulty,tests.shaped,tests.staged,tests.faces_held,tests.text_held",
    }
    with Worker(redis_server.url, concurrency=2, env=env, log_file=str(log)) as running:
        yield running


@pytest.fixture(scope="session")
def big_scene():
    """Big enough that a job runs for a while on two processes: 48 tiles of QR recognition, with its truth."""
    from pipeline.scenes.codes import qr_scene

    scene = qr_scene(4000, 3000, count=16, seam_share=0.5, seed=21)
    path = IMAGES_ROOT / "big-qr.png"
    cv2.imwrite(str(path), scene.image)
    return scene, str(path)


@pytest.fixture
def images_root() -> Path:
    """The folder the workers may read images from (TILEREC_ALLOWED_ROOTS)."""
    return IMAGES_ROOT


def tilerec_keys(server: RedisServer) -> list[bytes]:
    return sorted(server.client().scan_iter("tilerec:job:*"))


def tilerec_left(client) -> list[bytes]:
    """tilerec's keys of jobs: theirs, their reservations and places in line, their inputs (not the measured tile
    costs, kept a week, nor the roster of the nodes that take tiles, kept while they run)."""
    from tasks.store import ROSTER_KEY

    kept = (b"tilerec:cost:", ROSTER_KEY.encode())
    return sorted(key for key in client.scan_iter("tilerec:*") if not key.startswith(kept))


def caller_app(url: str) -> Celery:
    """Another program's Celery app on `url`, calling tilerec's tasks by name as any app may (JSON only)."""
    caller = Celery("caller", broker=url, backend=url, set_as_current=False)
    caller.conf.update(accept_content=["json"], result_accept_content=["json"], task_serializer="json")
    return caller


def once_per_run(factory: pytest.TempPathFactory, name: str, build: Callable[[Path], T]) -> T:
    """`build(folder)`'s value, built once per test run: a module's fixture is built in every test process that
    runs one of its tests (both, under `-n 2`), so a costly one (the bench's smoke run, a clip recognized in
    process) is built by the first process that asks, in a folder of the run's, while the other waits for it; the
    value is pickled there, the folder is the build's to fill and the tests' to read."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        folder = factory.mktemp(name)
        return build(folder)
    shared = factory.getbasetemp().parent  # the run's folder, above each test process's own
    folder, value = shared / name, shared / f"{name}.pickle"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released as the file closes, by this process or by its death
        if not value.exists():
            shutil.rmtree(folder, ignore_errors=True)  # what a build that failed left
            folder.mkdir()
            value.write_bytes(pickle.dumps(build(folder)))
    return pickle.loads(value.read_bytes())
