"""`tilerec` as a user runs it: a subprocess, on synthetic scenes whose QR codes and boxes are known.

Expected values come from the scenes' ground truth (pipeline.scenes.codes), never from the program's own output.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import cv2
import numpy as np
import pytest
import redis

from pipeline.recognizers import available
from pipeline.scenes.codes import Scene, Truth, qr_scene
from pipeline.tiling import grid
from tasks.cli.clusters import worker_command
from tasks.cli.errors import CliError
from tasks.cli.inputs import check_image, output_path, parse_param, parse_size
from tasks.local import RedisServer, Worker, free_port
from tests.faulty import holding, release

CLI = [sys.executable, "-m", "tasks.cli"]
T = TypeVar("T")


def cli_env() -> dict[str, str]:
    """This environment without any TILEREC_* setting, so no test picks up a broker by accident."""
    return {key: value for key, value in os.environ.items() if not key.startswith("TILEREC_")}


def tilerec(*args: str, timeout: float = 90, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {**cli_env(), **(env or {})}
    return subprocess.run([*CLI, *args], env=environment, capture_output=True, text=True, timeout=timeout)


def interruptible() -> None:
    """Run in a CLI child this test interrupts, before it starts: Ctrl-C at its default and not blocked, so Python
    turns it into KeyboardInterrupt whatever this test process carries (an ignored or a blocked SIGINT passes
    through fork and exec, and a test's process is shared with whatever ran before it)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def one_error_line(completed: subprocess.CompletedProcess[str]) -> str:
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1, completed.stderr
    assert lines[0].startswith("tilerec: error: ") and "Traceback" not in completed.stderr
    return lines[0]


def write_scene(folder: Path, name: str, scene: Scene) -> Path:
    path = folder / name
    assert cv2.imwrite(str(path), scene.image)
    return path


@pytest.fixture(scope="module")
def scene() -> Scene:
    return qr_scene(1800, 1400, count=6, seed=11)


@pytest.fixture
def scene_png(tmp_path: Path, scene: Scene) -> Path:
    return write_scene(tmp_path, "scene.png", scene)


def assert_matches_truth(detections: list[dict], truths: list[Truth], tolerance: float = 3.0) -> None:
    """Every known payload exactly once, its box within `tolerance` px of the truth."""
    texts = sorted(record.get("text") for record in detections)
    assert texts == sorted(truth.text for truth in truths)
    by_text = {record["text"]: record for record in detections}
    for truth in truths:
        box = by_text[truth.text]["box"]
        assert np.allclose(box, truth.box, atol=tolerance), (truth, box)


# -------------------------------------------------------------------------------------------------- embedded mode


@pytest.mark.cluster
def test_run_embedded_end_to_end(tmp_path: Path, scene: Scene, scene_png: Path) -> None:
    out_json, out_png = tmp_path / "result.json", tmp_path / "annotated.png"
    began = time.monotonic()
    completed = tilerec(
        "run",
        str(scene_png),
        "-r",
        "qrcode",
        "--workers",
        "2",
        "--json",
        str(out_json),
        "--annotate",
        str(out_png),
        "--quiet",
    )
    elapsed = time.monotonic() - began
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout == "" and completed.stderr == ""  # --quiet: nothing on either stream
    result = json.loads(out_json.read_text())
    assert result["schema"] == "tilerec/recognition@2"
    assert (result["image"]["width"], result["image"]["height"]) == (1800, 1400)
    assert result["image"]["source"] == str(scene_png.resolve())
    assert_matches_truth(result["detections"], scene.truths)

    original, annotated = cv2.imread(str(scene_png)), cv2.imread(str(out_png))
    assert annotated.shape == original.shape
    near = np.zeros(original.shape[:2], dtype=bool)
    for truth in scene.truths:
        x, y, w, h = truth.box
        assert (annotated[y, x : x + w] != original[y, x : x + w]).any(), truth  # the box's top edge is drawn
        near[max(0, y - 40) : y + h + 10, max(0, x - 10) : x + w + 300] = True  # box, caption and margins
    assert (~near).mean() > 0.5
    assert (annotated[~near] == original[~near]).all()
    print(f"embedded run, cluster start to stop: {elapsed:.1f} s")


@pytest.mark.cluster
def test_several_images_run_as_concurrent_jobs_and_print_a_summary(tmp_path: Path, scene: Scene) -> None:
    other = qr_scene(900, 700, count=2, seed=5, prefix="other")
    first, second = write_scene(tmp_path, "first.png", scene), write_scene(tmp_path, "second.png", other)
    completed = tilerec(
        "run",
        str(first),
        str(second),
        "-r",
        "qrcode",
        "--workers",
        "2",
        "--json",
        "-",
        "--annotate",
        str(tmp_path / "{stem}-annotated.png"),
    )
    assert completed.returncode == 0, completed.stderr
    results = json.loads(completed.stdout)  # --json -: stdout is the JSON and nothing else
    assert [r["image"]["source"] for r in results] == [str(first.resolve()), str(second.resolve())]
    assert_matches_truth(results[0]["detections"], scene.truths)
    assert_matches_truth(results[1]["detections"], other.truths)
    assert (tmp_path / "first-annotated.png").exists() and (tmp_path / "second-annotated.png").exists()
    summary = completed.stderr  # not a terminal: plain lines, no progress bars or colour codes
    assert f"{first}: {len(scene.truths)} detections (qrcode {len(scene.truths)})" in summary
    tiles = len(grid(*scene.image.shape[:2]))
    tiling = results[0]["tiling"]
    assert tiling["tiles"] == tiles and 1 <= tiling["tasks"] <= tiling["batches"] <= tiles
    assert f"{tiles} tiles in {tiling['batches']} batches, {tiling['tasks']} tasks" in summary
    assert f"{second}: {len(other.truths)} detections (qrcode {len(other.truths)})" in summary
    assert "\x1b[" not in summary


def descendants(pid: int) -> dict[int, str]:
    """pid → command line of every process below `pid`, read from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                parents[int(entry.name)] = int(fields[1])
            except (OSError, IndexError):
                continue
    found, frontier = {}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in found:
                found[child] = command_line(child)
                frontier.append(child)
    return {child: line for child, line in found.items() if line is not None}


def command_line(pid: int) -> str | None:
    """None for a process that is gone or a zombie."""
    try:
        if (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) == "Z":
            return None
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, IndexError):
        return None


def local_cluster_of(pid: int) -> tuple[int, str] | None:
    """(redis port, worker hostname) of the private cluster below `pid`, once both processes exist."""
    lines = descendants(pid).values()
    ports = [
        m.group(1)
        for line in lines
        if "redis-server" in line and (m := re.search(r"(?:127\.0\.0\.1:|--port )(\d+)", line))
    ]
    hosts = [m.group(1) for line in lines if (m := re.search(r"--hostname (\S+)", line))]
    return (int(ports[0]), hosts[0]) if ports and hosts else None


def processes_mentioning(*needles: str) -> list[str]:
    lines = [command_line(int(entry.name)) for entry in Path("/proc").iterdir() if entry.name.isdigit()]
    return [line for line in lines if line and any(needle in line for needle in needles)]


def wait_for(predicate: Callable[[], T], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def gate(tmp_path: Path) -> Iterator[Path]:
    """Where the `tests.faulty:Held` recognizer holds every tile until the test releases them; released at the end,
    so the session's worker processes are free again."""
    folder = tmp_path / "gate"
    folder.mkdir()
    yield folder
    release(folder)


def held(gate: Path) -> tuple[str, ...]:
    """`tilerec run` arguments for QR codes whose tiles wait at `gate`: the job lasts until the test releases it."""
    return ("-r", "tests.faulty:Held", "--param", f"gate={gate}")


HELD_ENV = {"TILEREC_PLUGIN_MODULES": "tests.faulty"}  # the CLI checks a `module:factory` recognizer's name too


SWALLOWED = """
import signal, sys, time
from tasks.cli.commands import _raise_interrupted, reraise_swallowed_interrupts
if sys.argv[1] == "hook":
    reraise_swallowed_interrupts()
signal.signal(signal.SIGTERM, _raise_interrupted)


class Finalized:
    def __init__(self, signum):
        self.signum = signum

    def __del__(self):  # the signal arrives while a finalizer runs: Python swallows what it raises there
        signal.raise_signal(self.signum)


try:
    Finalized(int(sys.argv[2]))
    for _ in range(100):  # the main flow goes on, as the CLI polls for its worker: the interrupt must land here
        time.sleep(0.02)
    print("not interrupted")
except KeyboardInterrupt as interrupt:
    print("interrupted", getattr(interrupt, "signum", signal.SIGINT))
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_a_finalizer_swallowed_still_stops_the_cli(signum: int) -> None:
    said, repo = {}, Path(__file__).resolve().parents[1]
    for hooked in ("hook", "bare"):
        done = subprocess.run([sys.executable, "-c", SWALLOWED, hooked, str(int(signum))], capture_output=True,
                              text=True, timeout=60, preexec_fn=interruptible, cwd=repo)  # fmt: skip
        said[hooked] = (done.stdout.strip(), done.stderr[-500:])
    assert said["bare"][0] == "not interrupted", said  # Python's own behaviour: what the hook is for
    assert said["hook"][0] == f"interrupted {int(signum)}", said


@pytest.mark.cluster
@pytest.mark.parametrize(
    ("moment", "signum", "code"),
    [
        ("mid-job", signal.SIGINT, 130),
        ("while the worker starts", signal.SIGINT, 130),
        ("mid-job", signal.SIGTERM, 128 + signal.SIGTERM),
    ],
)
def test_ctrl_c_leaves_no_process_behind(scene_png: Path, gate: Path, moment: str, signum: int, code: int) -> None:
    cli = subprocess.Popen(
        [*CLI, "run", str(scene_png), *held(gate), "--workers", "2"],
        env={**cli_env(), **HELD_ENV},
        preexec_fn=interruptible,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        port, hostname = wait_for(lambda: local_cluster_of(cli.pid), 30, "the local cluster's processes")
        if moment == "mid-job":
            client = redis.Redis(port=port)
            totals = wait_for(lambda: list(client.scan_iter("tilerec:job:*:total")), 60, "the job to be tiled")
            total = int(client.get(totals[0]))
            done = int(client.get(totals[0].replace(b":total", b":done")) or 0)
            assert done < total
            wait_for(lambda: holding(gate), 60, "a tile to be held")
        running = descendants(cli.pid)  # mid-job: redis, the worker and its pool
        assert len(running) >= (4 if moment == "mid-job" else 2), running
        cli.send_signal(signum)
        began = time.monotonic()
        _, stderr = cli.communicate(timeout=30)
        print(f"{signal.Signals(signum).name} {moment}: exited after {time.monotonic() - began:.1f} s")
    finally:
        if cli.poll() is None:
            cli.kill()
    assert cli.returncode == code
    assert stderr.strip().splitlines()[-1] == "tilerec: error: interrupted" and "Traceback" not in stderr
    left = {pid: line for pid, line in running.items() if command_line(pid) == line}
    assert not left, left
    assert not processes_mentioning(f"127.0.0.1:{port}", f"--port {port}", hostname)


@pytest.mark.cluster
def test_demo_runs_the_whole_flow(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    completed = tilerec(
        "demo", "--size", "1600x1200", "--count", "4", "--seed", "3", "--out", str(out), "--workers", "2"
    )
    assert completed.returncode == 0, completed.stderr
    truths = qr_scene(1600, 1200, count=4, seed=3).truths  # the demo's scene, rebuilt here from its seed
    assert "found 4 of 4 known QR codes" in completed.stdout
    scene_png = cv2.imread(str(out / "scene.png"))
    assert scene_png.shape == (1200, 1600, 3)
    assert_matches_truth(json.loads((out / "scene.json").read_text())["detections"], truths)
    assert cv2.imread(str(out / "scene-annotated.png")).shape == scene_png.shape


# ---------------------------------------------------------------------------------------------- a running cluster


def input_keys(server: RedisServer) -> set[bytes]:
    return set(server.client().scan_iter("tilerec:input:*"))


def test_run_with_a_broker_uploads_the_image(
    tmp_path: Path, scene: Scene, scene_png: Path, redis_server: RedisServer, worker: Worker
):
    before = input_keys(redis_server)
    out = tmp_path / "result.json"
    completed = tilerec("run", str(scene_png), "-r", "qrcode", "--broker", redis_server.url, "--json", str(out))
    assert completed.returncode == 0, completed.stderr
    result = json.loads(out.read_text())
    assert_matches_truth(result["detections"], scene.truths)
    assert result["image"]["source"] == str(scene_png.resolve())  # tmp_path: outside the worker's allowed roots
    assert input_keys(redis_server) <= before  # the upload was removed after the job
    assert "starting a local cluster" not in completed.stderr


def test_second_stage_flags(tmp_path: Path, redis_server: RedisServer, worker: Worker) -> None:
    """The example plugin's optional second stage, asked for and bounded from the command line: the two
    best-scored spots are measured on their crops, the third is counted as over the limit."""
    image = np.full((900, 1400), 40, dtype=np.uint8)
    cv2.rectangle(image, (100, 100), (160, 160), 255, -1)  # squares fill their boxes: score 1
    cv2.rectangle(image, (700, 500), (740, 540), 255, -1)
    cv2.circle(image, (1200, 300), 30, 255, -1)  # a disc fills less of its box: the lowest score
    path = tmp_path / "spots.png"
    cv2.imwrite(str(path), image)
    completed = tilerec("run", str(path), "-r", "bright-spots", "--second-stage", "--max-crops", "2",
                        "--broker", redis_server.url, "--json", "-", "--quiet")  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout)
    assert result["second_stage"]["crops"] == 2 and result["second_stage"]["over_limit"] == 1
    measured = sorted((d["box"], d.get("data", {}).get("bright_pixels")) for d in result["detections"])
    assert measured == [([100, 100, 61, 61], 61 * 61), ([700, 500, 41, 41], 41 * 41), ([1170, 270, 61, 61], None)]


def test_coco_format(scene: Scene, scene_png: Path, redis_server: RedisServer, worker: Worker) -> None:
    completed = tilerec(
        "run",
        str(scene_png),
        "-r",
        "qrcode",
        "--broker",
        redis_server.url,
        "--format",
        "coco",
        "--json",
        "-",
        "--quiet",
    )
    assert completed.returncode == 0, completed.stderr
    coco = json.loads(completed.stdout)
    assert coco["images"] == [{"id": 1, "file_name": str(scene_png), "width": 1800, "height": 1400}]
    assert coco["categories"] == [{"id": 1, "name": "qrcode", "supercategory": "tilerec"}]
    annotations = coco["annotations"]
    assert len(annotations) == len(scene.truths)
    assert all(a["image_id"] == 1 and a["category_id"] == 1 and 0 < a["score"] <= 1 for a in annotations)
    for truth in scene.truths:
        assert sum(np.allclose(a["bbox"], truth.box, atol=3) for a in annotations) == 1, truth


def test_shared_path_sends_the_path_and_a_failed_job_is_one_line(
    tmp_path: Path,
    scene: Scene,
    images_root: Path,
    redis_server: RedisServer,
    worker: Worker,
) -> None:
    shared = write_scene(images_root, "shared.png", scene)
    try:
        completed = tilerec(
            "run", str(shared), "-r", "qrcode", "--broker", redis_server.url, "--shared-path", "--json", "-", "--quiet"
        )
        assert completed.returncode == 0, completed.stderr
        assert_matches_truth(json.loads(completed.stdout)["detections"], scene.truths)
    finally:
        shared.unlink(missing_ok=True)

    outside = write_scene(tmp_path, "outside.png", scene)  # not under the worker's TILEREC_ALLOWED_ROOTS
    failed = tilerec("run", str(outside), "-r", "qrcode", "--broker", redis_server.url, "--shared-path", "--quiet")
    assert failed.returncode == 1
    line = one_error_line(failed)
    assert str(outside) in line and "outside the allowed roots" in line


def test_timeout_gives_up_and_cleans_the_job(
    scene_png: Path, gate: Path, redis_server: RedisServer, worker: Worker
) -> None:
    run = ("run", str(scene_png), *held(gate), "--broker", redis_server.url, "--timeout", "2", "--quiet")
    completed = tilerec(*run, env=HELD_ENV)  # its tiles held until released below: only the timeout ends it
    assert completed.returncode == 4
    assert "timed out after 2 s" in one_error_line(completed)
    release(gate)  # the held tiles end, finding their job given up
    client = redis_server.client()
    wait_for(lambda: not list(client.scan_iter("tilerec:job:*:tile:*")), 20, "the job's tiles to be deleted")


def test_cancel_by_job_id(
    scene_png: Path, gate: Path, redis_server: RedisServer, worker: Worker, images_root: Path, monkeypatch
) -> None:
    from tasks.client import submit

    monkeypatch.setenv("TILEREC_PLUGIN_MODULES", "tests.faulty")
    path = images_root / "held-cancel.png"
    path.write_bytes(scene_png.read_bytes())
    job = submit(str(path), "tests.faulty:Held", gate=str(gate))
    wait_for(lambda: job.progress()[1], 30, "the job to be tiled")
    wait_for(lambda: holding(gate), 30, "a tile to be held")
    completed = tilerec("cancel", job.id, "--broker", redis_server.url)
    assert completed.returncode == 0, completed.stderr
    assert f"cancelled {job.id}" in completed.stderr
    release(gate)  # the held tiles end; the job's merge finds it cancelled
    with pytest.raises(Exception, match="was cancelled") as raised:
        job.get(timeout=60)
    assert type(raised.value).__name__ == "JobCancelled"
    wait_for(lambda: not list(redis_server.client().scan_iter("tilerec:job:*")), 20, "the job's keys to be deleted")


# ------------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (["run", "/no/such/image.png", "-r", "qrcode"], "image file '/no/such/image.png' does not exist"),
        (["run", __file__, "-r", "qrcode"], "not an image format tilerec reads"),
        (["run", __file__, "-r", "no-such-recognizer"], "unknown recognizer 'no-such-recognizer'"),
        (["run", __file__, "-r", "faces", "--param", "min_size=big"], "parameter 'min_size' must be int"),
        (["run", __file__, "-r", "qrcode", "--overlap", "1.5"], "overlap must be a ratio"),
        (["run", __file__, "-r", "qrcode", "--format", "coco"], "--format coco needs --json"),
        (["run", __file__, "-r", "qrcode", "--second-stage"], "recognizer 'qrcode' has no second stage"),
        (["demo", "--size", "4000by3000"], "size must be WIDTHxHEIGHT"),
    ],
)
def test_bad_arguments_fail_fast_with_one_line(arguments: list[str], expected: str) -> None:
    completed = tilerec(*arguments, timeout=30)  # fails before any cluster starts: a hang is the timeout's error
    assert completed.returncode == 2
    assert expected in completed.stderr.strip()
    assert len(completed.stderr.strip().splitlines()) == 1 and "Traceback" not in completed.stderr


def test_checking_an_image_reads_its_header_not_the_whole_file(tmp_path: Path) -> None:
    """The workers read a gigapixel image window by window: the command line must not load it whole to check it."""
    header = cv2.imencode(".png", np.zeros((300, 200), np.uint8))[1].tobytes()[:-12]  # 200x300, up to its IEND
    big = tmp_path / "big.png"
    with open(big, "wb") as sparse:
        sparse.write(header)
        sparse.truncate(2 << 30)  # 2 GiB, all but the header a hole: nothing on disk
    # the checking process's own peak (VmHWM): getrusage's ru_maxrss would also count the peak of the test process
    # that started it, as Linux carries it across fork and exec (724 MB once, beside other tests under -n 2)
    code = (
        "import pathlib, sys; from tasks.cli.inputs import check_image; check_image(sys.argv[1], 10**5); "
        "print(next(line.split()[1] for line in pathlib.Path('/proc/self/status').read_text().splitlines() "
        "if line.startswith('VmHWM:')))"
    )
    checked = subprocess.run([sys.executable, "-c", code, str(big)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stderr
    assert int(checked.stdout) < 500 * 1024, "peak RSS (KiB): the file was read whole"
    with pytest.raises(CliError, match=r"200x300 = 60,000 pixels, above the limit of 50,000"):
        check_image(str(big), 50_000)


def test_unreachable_broker_fails_within_seconds(scene_png: Path) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    completed = tilerec("run", str(scene_png), "-r", "qrcode", "--broker", url, timeout=30)  # no retrying for ever
    assert completed.returncode == 3
    assert f"cannot reach the broker at {url}" in one_error_line(completed)


def test_broker_from_the_environment_is_used(scene_png: Path) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    env = {**cli_env(), "TILEREC_BROKER_URL": url}
    completed = subprocess.run(
        [*CLI, "run", str(scene_png), "-r", "qrcode"], env=env, capture_output=True, text=True, timeout=30
    )
    assert completed.returncode == 3
    assert f"cannot reach the broker at {url}" in one_error_line(completed)


# ------------------------------------------------------------------------------------------------ other commands


def test_recognizers_lists_every_recognizer_with_its_parameters() -> None:
    completed = tilerec("recognizers", timeout=30)
    assert completed.returncode == 0
    blocks: dict[str, str] = {}  # name → its lines: the name and description, then its parameters indented
    for line in completed.stdout.splitlines():
        if not line.startswith(" "):
            name = line.split()[0]
        blocks[name] = blocks.get(name, "") + line + "\n"
    assert "qrcode" in blocks and "params: (none)" in blocks["qrcode"]
    for spec in available():
        assert spec.description in blocks[spec.name]
        for key, default in spec.params.items():
            shown = default if isinstance(default, str) and default else json.dumps(default)
            assert f" {key}={shown}" in blocks[spec.name], (spec.name, key)

    listed = json.loads(tilerec("recognizers", "--json", timeout=30).stdout)
    assert {r["name"]: r["params"] for r in listed} == {s.name: dict(s.params) for s in available()}


def test_installed_console_script_shows_help() -> None:
    script = Path(sys.executable).parent / "tilerec"
    if not script.exists():
        pytest.skip("the tilerec console script is not installed next to this Python")
    completed = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=30)
    assert completed.returncode == 0
    for command in ("run", "recognizers", "demo", "worker"):
        assert command in completed.stdout


# ------------------------------------------------------------------------------------------------- in process


def test_param_values_are_json_when_they_can_be() -> None:
    assert parse_param("min_size=24") == ("min_size", 24)
    assert parse_param("scale=1.05") == ("scale", 1.05)
    assert parse_param("flag=true") == ("flag", True)
    assert parse_param("dictionary=DICT_4X4_50") == ("dictionary", "DICT_4X4_50")
    assert parse_param('text="42"') == ("text", "42")
    assert parse_param("expr=a=b") == ("expr", "a=b")
    for bad in ("novalue", "=1"):
        with pytest.raises(CliError):
            parse_param(bad)


def test_size_parsing() -> None:
    assert parse_size("4000x3000") == (4000, 3000)
    assert parse_size("640X480") == (640, 480)


def test_output_paths_for_several_images(tmp_path: Path) -> None:
    from tasks.cli.inputs import Target

    target = Target("in/a.png", tmp_path / "a.png")
    assert output_path("out.png", target, 0, 1) == Path("out.png")
    assert output_path("out.png", target, 0, 2) == Path("out-a.png")
    assert output_path("dir/{index}-{stem}.jpg", target, 2, 3) == Path("dir/3-a.jpg")
    with pytest.raises(CliError):
        output_path("{nope}.png", target, 0, 2)


def test_worker_command_passes_arguments_through() -> None:
    command, env = worker_command(["--concurrency", "4", "-Q", "tilerec.tiles", "--broker", "redis://h:1/0"])
    assert command == [sys.executable, "-m", "celery", "-A", "tasks", "worker", "--concurrency", "4", "-Q",
                       "tilerec.tiles"]  # fmt: skip
    assert env["TILEREC_BROKER_URL"] == "redis://h:1/0"
    command, env = worker_command(["--broker=redis://h:2/0", "--loglevel", "INFO", "-c", "auto"])
    assert env["TILEREC_BROKER_URL"] == "redis://h:2/0"
    assert command[-4:-1] == ["--loglevel", "INFO", "-c"]
    assert 1 <= int(command[-1]) <= (os.cpu_count() or 1)
    command, _ = worker_command(["--concurrency=auto"])
    assert command[-2] == "--concurrency" and int(command[-1]) >= 1
    with pytest.raises(CliError):
        worker_command(["--broker"])


def test_worker_execs_celery_worker() -> None:
    completed = tilerec("worker", "--help", timeout=60)
    assert completed.returncode == 0, completed.stderr
    assert "--concurrency" in completed.stdout and "--queues" in completed.stdout  # celery worker's own help
