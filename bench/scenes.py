"""The benchmark's scenes as files on disk (PNG, what a user hands tilerec) with their ground truth beside them.

A scene is written once per (kind, size, seed) and reused by later runs in the same output folder: writing a
16000² PNG takes longer than recognizing it with a cheap recognizer.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from pipeline.scenes.codes import Scene, Truth, code_scene

PHOTO_KINDS = {"faces": ("faces-dnn",), "objects": ("objects",)}
CODE_KIND = "codes"


@dataclass(frozen=True)
class SceneFile:
    """A scene on disk: its PNG, its truths and the recognizers that are scored on it."""

    kind: str
    size: int
    path: Path
    truths: list[Truth]
    recognizers: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.size}"

    @property
    def pixels(self) -> int:
        return self.size * self.size

    def truths_for(self, recognizer: str) -> list[Truth]:
        """The objects this recognizer is meant to find (the codes scene mixes three kinds)."""
        labels = {"qrcode": {"qrcode"}, "aruco": {"aruco"}, "barcode": {"barcode"}}.get(recognizer)
        return [t for t in self.truths if labels is None or t.label in labels]


def shared_images_dir() -> Path:
    """../shared/images beside the checkout, or beside TILEREC_MODEL_DIR (../shared/models) when that is set."""
    model_dir = os.environ.get("TILEREC_MODEL_DIR")
    if model_dir:
        return Path(model_dir).resolve().parent / "images"
    return Path(__file__).resolve().parents[2] / "shared" / "images"


def astronaut() -> np.ndarray | None:
    path = shared_images_dir() / "astronaut.png"
    return cv2.imread(str(path)) if path.is_file() else None


def _photo_scene(kind: str, size: int, seed: int, tile: int, overlap: float) -> Scene | None:
    """Pasted astronaut faces, or astronaut people and drawn clocks, as the DNN tests build them; None without the
    photo or without pipeline.scenes.photos."""
    try:
        from pipeline.scenes.photos import ASTRONAUT_FACE, ASTRONAUT_PERSON, Picture, clock, photo_scene
    except ImportError:
        return None
    photo = astronaut()
    if photo is None:
        return None
    count = max(4, round(0.8 * size * size / 1e6))
    if kind == "faces":
        pictures, scales = [Picture(photo, ASTRONAUT_FACE, "face")], (0.35, 0.5, 0.7)
    else:
        pictures, scales = [Picture(photo[:, :400], ASTRONAUT_PERSON, "person"), clock(400)], (0.5, 0.25)
    return photo_scene(pictures, size, size, count, scales, seam_share=0.5, tile=tile, overlap=overlap, seed=seed)


def _write(scene: Scene, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".tmp.png")
    if not cv2.imwrite(str(partial), scene.image):
        raise OSError(f"could not write {partial}")
    partial.replace(path)
    truths = [{"label": t.label, "box": list(t.box), "text": t.text} for t in scene.truths]
    path.with_suffix(".json").write_text(json.dumps(truths))


def _read_truths(path: Path) -> list[Truth] | None:
    meta = path.with_suffix(".json")
    if not (path.is_file() and meta.is_file()):
        return None
    return [Truth(t["label"], tuple(t["box"]), t["text"]) for t in json.loads(meta.read_text())]


def scene_file(
    folder: Path,
    kind: str,
    size: int,
    seed: int,
    per_megapixel: float = 2.0,
    tile: int = 640,
    overlap: float = 0.2,
) -> SceneFile | None:
    """The scene of this kind and size, written on first use; None for a photo scene that cannot be built here."""
    stem = f"{kind}-{size}-s{seed}" + (f"-d{per_megapixel:g}" if kind == CODE_KIND else "") + f"-t{tile}-o{overlap:g}"
    path = folder / f"{stem}.png"
    truths = _read_truths(path)
    if truths is None:
        if kind == CODE_KIND:
            built: Scene | None = code_scene(
                size, size, seed=seed, per_megapixel=per_megapixel, tile=tile, overlap=overlap
            )
        else:
            built = _photo_scene(kind, size, seed, tile, overlap)
        if built is None:
            return None
        _write(built, path)
        truths = built.truths
    recognizers = ("qrcode", "aruco", "barcode") if kind == CODE_KIND else PHOTO_KINDS[kind]
    return SceneFile(kind, size, path, truths, recognizers)


def one_tile_image(folder: Path, seed: int) -> Path:
    """A 640×480 picture with one ArUco marker: one tile, for the per-job latency."""
    path = folder / f"one-tile-s{seed}.png"
    if not path.is_file():
        scene = code_scene(640, 480, kinds=("aruco",), count=1, seam_share=0, edge_share=0, seed=seed)
        _write(scene, path)
    return path
