"""Galleries of people in Redis, enrolled by real workers from real photos (../shared/images/people)."""

from __future__ import annotations

import shutil

import cv2
import numpy as np
import pytest

from tasks import client, gallery
from tests.conftest import caller_app
from tests.test_faces import PEOPLE, photo


@pytest.fixture
def photos(images_root):
    """The people photos where the workers may read them, and composites made of them."""
    folder = images_root / "people"
    folder.mkdir(exist_ok=True)
    for name in ("obama", "obama2", "biden"):
        shutil.copy(PEOPLE / f"{name}.jpg", folder / f"{name}.jpg")
    pair = np.full((1200, 2000, 3), 200, np.uint8)  # obama and biden side by side, at like sizes
    pair[:1137, :910] = photo("obama")
    pair[:1200, 1000:1626] = photo("obama2")[:1200]
    pair[:, 1000:1970] = cv2.resize(photo("biden"), (970, 2204))[:1200]
    cv2.imwrite(str(folder / "pair.png"), pair)
    cv2.imwrite(str(folder / "tiny.png"), cv2.resize(photo("obama"), (91, 114), interpolation=cv2.INTER_AREA))
    cv2.imwrite(str(folder / "wall.png"), np.full((600, 800, 3), 120, np.uint8))
    (folder / "notes.jpg").write_text("not a photo")
    yield folder
    shutil.rmtree(folder)


def gallery_keys(redis_server) -> list[bytes]:
    return sorted(redis_server.client().scan_iter("tilerec:galler*"))


@pytest.fixture
def clean(redis_server):
    yield
    for name in gallery.galleries(redis_server.client()):
        for person in client.gallery_list(name)["people"]:
            client.gallery_remove(person["name"], name)
    assert gallery_keys(redis_server) == []


def test_a_person_is_enrolled_listed_renamed_and_removed_with_every_key(worker, redis_server, photos, clean):
    added = client.gallery_add("Barack", [photos / "obama.jpg", photos / "obama2.jpg"], "family", timeout=60)
    assert added["added"] == 2 and added["embeddings"] == 2
    assert [face["image"] for face in added["faces"]] == ["obama.jpg", "obama2.jpg"]
    x, y, w, _ = added["faces"][0]["box"]
    assert 330 < x < 420 and 50 < y < 130 and 180 < w < 290  # the face in obama.jpg (373, 89, 235 wide)
    assert "vector" not in str(added) and len(str(added)) < 400  # names and boxes, never embeddings
    client.gallery_add("Joe", [photos / "biden.jpg"], "family", timeout=60)
    listed = client.gallery_list("family")
    assert listed["model"] == "dlib-resnet-v1"
    assert [(p["name"], p["embeddings"], p["images"]) for p in listed["people"]] == [
        ("Barack", 2, ["obama.jpg", "obama2.jpg"]),
        ("Joe", 1, ["biden.jpg"]),
    ]
    assert client.gallery_list()["people"] == []  # the default gallery is another one
    client.gallery_rename("Barack", "Barack Obama", "family")
    assert [p["name"] for p in client.gallery_list("family")["people"]] == ["Barack Obama", "Joe"]
    keys = gallery_keys(redis_server)
    assert len(keys) == 4 + 1  # galleries, model, people, one hash per person
    assert all(redis_server.client().ttl(k) == -1 for k in keys), "galleries have no TTL"
    assert client.gallery_remove("Barack Obama", "family") == 2
    left = gallery_keys(redis_server)
    joe = redis_server.client().hget("tilerec:gallery:family:people", "Joe").decode()
    family = [f"tilerec:gallery:family:{part}".encode() for part in ("model", "people", f"person:{joe}")]
    assert left == sorted([b"tilerec:galleries", *family])
    client.gallery_remove("Joe", "family")
    assert gallery_keys(redis_server) == []


@pytest.mark.parametrize(
    ("name", "box", "error"),
    [
        ("wall.png", None, r"^photo wall.png: no face found$"),
        ("pair.png", None, r"^photo pair.png: 2 faces found; choose one with --box x,y,w,h \(faces at x,y,w,h: "),
        ("pair.png", [0, 0, 300, 300], r"^photo pair.png: no face in the box 0,0,300,300 \(faces at"),
        ("tiny.png", None, r"^photo tiny.png: the face at .* px on its shorter side; at least 32 px are needed"),
        ("notes.jpg", None, r"^photo notes.jpg: .*(not an image|cannot be decoded|unknown|format)"),
        ("missing.jpg", None, r"^photo missing.jpg: image file .* does not exist$"),
    ],
)
def test_a_photo_that_cannot_be_enrolled_says_why_in_one_line_and_stores_nothing(
    worker, redis_server, photos, clean, name, box, error
):
    good = [] if box else [photos / "obama.jpg"]  # a box is for every photo
    with pytest.raises(gallery.GalleryError, match=error) as raised:
        client.gallery_add("Someone", [*good, photos / name], box=box, timeout=60)
    assert "\n" not in str(raised.value)
    assert gallery_keys(redis_server) == [], "one bad photo enrolls none"


def test_a_box_chooses_the_face_among_several(worker, redis_server, photos, clean):
    added = client.gallery_add("Joe", [photos / "pair.png"], box=[1000, 0, 970, 1200], timeout=60)
    assert added["faces"][0]["box"][0] > 1000


def test_names_that_cannot_be_people_are_refused(worker, redis_server, photos, clean):
    for name in ("unknown", "unknown-3", " ", "a\nb"):
        with pytest.raises(gallery.GalleryError, match="name"):
            client.gallery_add(name, [photos / "obama.jpg"], timeout=60)
    with pytest.raises(gallery.GalleryError, match="gallery's name"):
        client.gallery_list("no spaces")
    with pytest.raises(gallery.GalleryError, match=r"gallery 'default' has no people"):
        client.gallery_remove("Nobody")


def test_another_app_calls_the_gallery_tasks_by_name(worker, redis_server, photos, clean):
    caller = caller_app(redis_server.url)
    added = caller.send_task("tilerec.gallery_add", args=["Barack", [str(photos / "obama.jpg")]]).get(timeout=60)
    assert added["embeddings"] == 1
    listed = caller.send_task("tilerec.gallery_list", kwargs={"gallery": "default"}).get(timeout=30)
    assert [p["name"] for p in listed["people"]] == ["Barack"]
    caller.send_task("tilerec.gallery_rename", args=["Barack", "Obama"]).get(timeout=30)
    removed = caller.send_task("tilerec.gallery_remove", args=["Obama"]).get(timeout=30)
    assert removed == {"gallery": "default", "removed": "Obama", "embeddings": 1}
