"""`python -m bench.screenshot [--out docs/images/flower-running-job.png]`: Flower's task list while a job runs.

A private Redis, a worker of two processes and Flower (loopback, no auth) with the task list's columns set as the
docs recommend; a YuNet job on the 8000² faces scene (about 8 s at W=2, its model from TILEREC_MODEL_DIR) is
submitted in batches of 24 tiles (12 rows fit a page), and once about a third of its tiles are done headless
Chromium takes the screenshot.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.scenes import scene_file
from tasks.local import RedisServer, Worker, _die_with_parent, _stop, _wait, free_port

COLUMNS = "name,state,args,kwargs,result,runtime,worker"  # the uuid is in the args
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]  # fmt: skip


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if found is None:
        raise SystemExit("no Chromium here: apt-get install chromium")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/images/flower-running-job.png"))
    args = parser.parse_args()
    browser = chromium()
    folder = Path(tempfile.mkdtemp(prefix="tilerec-screenshot-"))
    scene = scene_file(folder, "faces", 8000, seed=5)
    if scene is None:
        raise SystemExit("no faces scene: ../shared/images/astronaut.png is missing")
    with RedisServer() as server:
        env = {"TILEREC_RESULT_BACKEND": server.url, "TILEREC_ALLOWED_ROOTS": str(folder)}
        with Worker(server.url, 2, env=env, log_file=str(folder / "worker.log")):
            port = free_port()
            flower = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "tasks", "--broker", server.url, "flower", f"--port={port}",
                 "--address=127.0.0.1", f"--tasks_columns={COLUMNS}"],
                env={**os.environ, "TILEREC_BROKER_URL": server.url}, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent,
            )  # fmt: skip
            try:
                url = f"http://127.0.0.1:{port}"
                _wait(lambda: _answers(url + "/healthcheck"), 30, "flower", flower)
                time.sleep(6)  # Flower turns the worker's task events on within 5 s
                from tasks.celery import configure
                from tasks.client import submit

                configure(broker_url=server.url, result_backend=server.url, tilerec_store_url=server.url)
                job = submit(str(scene.path), "faces-dnn", score_threshold=0.8, batch_size=24)  # a page of rows
                _wait(lambda: (lambda p: p[1] and p[0] >= p[1] // 3)(job.progress()), 120, "a third of the tiles")
                args.out.parent.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryDirectory() as profile:
                    subprocess.run(
                        [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--window-size=1900,1000",
                         "--virtual-time-budget=4000", f"--screenshot={args.out.resolve()}", url + "/tasks"],
                        check=True, capture_output=True, timeout=60,
                    )  # fmt: skip
                job.get(timeout=300)
            finally:
                _stop(flower, 10)
    shutil.rmtree(folder, ignore_errors=True)
    print(args.out)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


if __name__ == "__main__":
    main()
