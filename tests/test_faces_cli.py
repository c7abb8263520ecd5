"""`tilerec gallery` and `tilerec run --identify` as a user runs them, on the real photos (../shared/images/people):
a private cluster whose galleries are kept in TILEREC_LOCAL_DATA between commands, and a cluster given by --broker."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.test_cli import CLI, cli_env, one_error_line
from tests.test_faces import PEOPLE

pytestmark = pytest.mark.cluster  # each command without --broker starts a private cluster (Redis and workers)

MODELS = Path(__file__).resolve().parents[2] / "shared" / "models"


def tilerec(local: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**cli_env(), "TILEREC_LOCAL_DATA": str(local), "TILEREC_MODEL_DIR": str(MODELS)}
    return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=timeout)


def ok(completed: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert completed.returncode == 0, completed.stderr
    return completed


def identities(run: Path) -> dict[str, list]:
    lines = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    return {Path(line["path"]).stem: [d["data"]["identity"] for d in line["result"]["detections"]] for line in lines}


@pytest.fixture
def sets(tmp_path) -> tuple[Path, Path]:
    """Two sets of photos: the first with two photos of one person and one of another, the second with two more
    photos of the first person."""
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    for name in ("obama", "obama2", "biden"):
        shutil.copy(PEOPLE / f"{name}.jpg", first)
    for name in ("obama3", "obama_partial_face"):
        shutil.copy(PEOPLE / f"{name}.jpg", second)
    return first, second


def test_a_run_groups_unknown_faces_into_people_and_a_named_group_is_tagged_later(tmp_path, sets):
    first, second = sets
    local, run1, run2 = tmp_path / "local", tmp_path / "run1", tmp_path / "run2"
    ok(tilerec(local, "run", str(first), "-r", "faces-dnn", "--identify", "family", "--out", str(run1), "-q",
               "--workers", "2", "--json", str(tmp_path / "run1.json")))  # fmt: skip
    # sorted file names: biden.jpg first, so its person is unknown-1, the other unknown-2
    assert identities(run1) == {"biden": ["unknown-1"], "obama": ["unknown-2"], "obama2": ["unknown-2"]}
    printed = json.loads((tmp_path / "run1.json").read_text())  # --json names the same groups as results.jsonl
    named = sorted(d["data"]["identity"] for result in printed for d in result["detections"])
    assert named == ["unknown-1", "unknown-2", "unknown-2"]
    assert '"embedding"' not in (run1 / "results.jsonl").read_text() + (run1 / "coco.json").read_text()
    with np.load(run1 / "faces.npz") as kept:
        assert kept["vectors"].shape == (3, 128) and sorted(kept["groups"]) == ["unknown-1", "unknown-2", "unknown-2"]
    coco = json.loads((run1 / "coco.json").read_text())
    assert sorted(a["data"]["identity"] for a in coco["annotations"]) == ["unknown-1", "unknown-2", "unknown-2"]
    named = ok(tilerec(local, "gallery", "add", "Barack", "--from", str(run1), "unknown-2", "--gallery", "family"))
    assert "2 face(s) of unknown-2" in named.stderr
    ok(tilerec(local, "run", str(second), "-r", "faces-dnn", "--identify", "family", "--out", str(run2), "-q",
               "--workers", "2"))  # fmt: skip
    assert identities(run2) == {"obama3": ["Barack"], "obama_partial_face": ["Barack"]}
    listed = json.loads(ok(tilerec(local, "gallery", "list", "--gallery", "family", "--json")).stdout)
    assert [(p["name"], p["embeddings"], p["images"]) for p in listed["people"]] == [
        ("Barack", 2, ["obama.jpg", "obama2.jpg"])
    ]
    missing = tilerec(local, "gallery", "add", "Joe", "--from", str(run1), "unknown-7", "--gallery", "family")
    expected = f"tilerec: error: --from {str(run1)!r}: no group 'unknown-7'; its groups: unknown-1, unknown-2"
    assert one_error_line(missing) == expected


def test_the_gallery_commands_on_the_kept_private_store_and_their_errors(tmp_path):
    local = tmp_path / "local"
    photo = str(PEOPLE / "obama.jpg")
    added = ok(tilerec(local, "gallery", "add", "Barack", photo, "--workers", "1"))
    assert "enrolled Barack in gallery default from 1 photo(s)" in added.stderr
    assert "Barack" in ok(tilerec(local, "gallery", "list")).stdout
    ok(tilerec(local, "gallery", "rename", "Barack", "Barack Obama"))
    boxed = tilerec(local, "gallery", "add", "Joe", photo, "--box", "0,0,10,10", "--workers", "1", "-q")
    assert one_error_line(boxed).startswith("tilerec: error: photo obama.jpg: no face in the box 0,0,10,10")
    removed = ok(tilerec(local, "gallery", "remove", "Barack Obama"))
    assert "removed Barack Obama and 1 embedding(s)" in removed.stderr
    assert "no people" in ok(tilerec(local, "gallery", "list")).stdout
    assert one_error_line(tilerec(local, "gallery", "remove", "Nobody")).endswith(
        "has no people (enroll one: tilerec gallery add NAME PHOTO)"
    )
    wrong = tilerec(local, "run", photo, "-r", "faces", "--identify", "family")
    assert "such as faces-dnn; recognizer 'faces' has none" in one_error_line(wrong)


def test_the_gallery_commands_on_a_cluster_given_by_broker(worker, redis_server, images_root, tmp_path):
    url = redis_server.url
    shutil.copy(PEOPLE / "biden.jpg", images_root / "biden-cli.jpg")
    try:
        ok(tilerec(tmp_path, "gallery", "add", "Joe", str(images_root / "biden-cli.jpg"), "--broker", url,
                   "--gallery", "cli-tests"))  # fmt: skip
    finally:
        (images_root / "biden-cli.jpg").unlink()
    listed = json.loads(
        ok(tilerec(tmp_path, "gallery", "list", "--gallery", "cli-tests", "--json", "--broker", url)).stdout
    )
    assert [p["images"] for p in listed["people"]] == [["uploaded photo"]], "uploaded: the workers need no path"
    ok(tilerec(tmp_path, "gallery", "remove", "Joe", "--gallery", "cli-tests", "--broker", url))
    assert list(redis_server.client().scan_iter("tilerec:gallery:cli-tests:*")) == []


def test_a_resumed_run_groups_its_new_faces_with_those_of_before(tmp_path):
    photos, local, run = tmp_path / "photos", tmp_path / "local", tmp_path / "run"
    photos.mkdir()
    for name in ("obama", "biden"):
        shutil.copy(PEOPLE / f"{name}.jpg", photos)
    args = ("run", str(photos), "-r", "faces-dnn", "--identify", "family", "--out", str(run), "-q", "--workers", "2")
    ok(tilerec(local, *args))
    shutil.copy(PEOPLE / "obama3.jpg", photos)  # another photo of the same person, run only by the resume
    ok(tilerec(local, *args, "--resume"))
    assert identities(run) == {"biden": ["unknown-1"], "obama": ["unknown-2"], "obama3": ["unknown-2"]}
    with np.load(run / "faces.npz") as kept:
        assert sorted(Path(image).name for image in kept["images"]) == ["biden.jpg", "obama.jpg", "obama3.jpg"]
