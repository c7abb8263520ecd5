"""`python -m bench.faces [--size 4000x3000] [--faces 24] [--workers 2] [--reps 3] [--out bench-out/faces]`: faces
per second for detection + identification, tilerec at W=2 (faces-dnn tiles, then the identities stage on each
merged face's full-resolution crop) against the same detector and embedder in one process on the whole image
(YuNet run once at the image's full size, dlib's ResNet on each face it finds, the same one-to-one matching).

Scenes: real photos (../shared/images/people) pasted small into a textured background, half of the faces across
tile seams (pipeline.scenes.photos), two people enrolled from photos not pasted. The two sides alternate which goes
first in each repetition, so a drift of the machine's speed hits both alike; the load average is recorded with each
figure (this machine is shared). Writes faces.json and faces.md: medians, faces/s, the ratio, and how many faces
each side found and named right.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from bench.cluster import Cluster
from pipeline.inference import recognize_image
from pipeline.recognizers import faces
from pipeline.recognizers.dnn import YUNET_FILE
from pipeline.scenes.codes import Scene, iou_xywh
from pipeline.scenes.photos import Picture, photo_scene

PEOPLE = Path(__file__).resolve().parents[2] / "shared" / "images" / "people"
MODELS = Path(__file__).resolve().parents[2] / "shared" / "models"
PASTED = (("obama2", "obama"), ("biden", "biden"), ("obama3", "obama"), ("obama_partial_face", "obama"))
ENROLLED = (("obama", "obama.jpg"), ("biden", "biden.jpg"))  # biden's only photo is both: his face at another size
FACE_PX = 90  # a pasted face's width at scale 1


def portrait(name: str, label: str) -> Picture:
    """A photo cut to its face with some surroundings, scaled so the face is FACE_PX wide."""
    image = cv2.imread(str(PEOPLE / f"{name}.jpg"))
    found = recognize_image(image, "faces-dnn", model=str(MODELS / YUNET_FILE)).detections
    x1, y1, x2, y2 = found.xyxy[int(np.argmax(found.scores))]
    w, h = x2 - x1, y2 - y1
    left, top = int(max(0, x1 - 0.4 * w)), int(max(0, y1 - 0.4 * h))
    right, bottom = int(min(image.shape[1], x2 + 0.4 * w)), int(min(image.shape[0], y2 + 0.4 * h))
    scale = FACE_PX / w
    cut = cv2.resize(image[top:bottom, left:right], None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    return Picture(cut, ((x1 - left) * scale, (y1 - top) * scale, w * scale, h * scale), label)


def scene(width: int, height: int, count: int, seed: int) -> Scene:
    return photo_scene([portrait(*pasted) for pasted in PASTED], width, height, count=count, scales=(0.7, 1.0),
                       seam_share=0.5, seed=seed)  # fmt: skip


def score(found: list[tuple[list[float], str | None]], truths: list[Any]) -> dict[str, int]:
    """Faces found (a detection on a truth, IoU >= 0.5) and named right, and detections on no face."""
    hits = [[identity for box, identity in found if iou_xywh(tuple(box), t.box) >= 0.5] for t in truths]
    on_face = sum(len(h) for h in hits)
    return {"found": sum(1 for h in hits if h), "named_right": sum(1 for h, t in zip(hits, truths, strict=True)
            if h == [t.label]), "extra": len(found) - on_face}  # fmt: skip


class WholeImage:
    """The user's alternative in one process: YuNet once on the whole image, dlib's ResNet on each face."""

    def __init__(self, gallery: faces.Gallery) -> None:
        self.detector = cv2.FaceDetectorYN.create(str(MODELS / YUNET_FILE), "", (320, 320), 0.7, 0.3, 5000)
        self.embedder = faces.get_embedder()
        self.gallery = gallery

    def __call__(self, image: np.ndarray) -> list[tuple[list[float], str | None]]:
        self.detector.setInputSize((image.shape[1], image.shape[0]))
        _, rows = self.detector.detect(image)
        rows = np.zeros((0, 15), np.float32) if rows is None else rows
        boxes, vectors, embedded = [], [], []
        for row in rows:
            box = np.array([row[0], row[1], row[0] + row[2], row[1] + row[3]])
            boxes.append([float(row[0]), float(row[1]), float(row[2]), float(row[3])])
            try:
                vectors.append(self.embedder.embed(image, box, row[4:14].reshape(5, 2)))
                embedded.append(len(boxes) - 1)
            except faces.FaceError:
                continue
        scores = faces.person_similarities(faces.stack(vectors), self.gallery)
        matches = faces.match_faces(scores, self.gallery.names, faces.default_threshold(self.gallery.model), True)
        names: list[str | None] = [None] * len(boxes)
        for row, match in zip(embedded, matches, strict=True):
            names[row] = match.identity
        return list(zip(boxes, names, strict=True))


def run(size: tuple[int, int], count: int, workers: int, reps: int, out: Path) -> dict[str, Any]:
    folder = (out / "scenes").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    for _, photo in ENROLLED:
        shutil.copy(PEOPLE / photo, folder / photo)
    scenes = [scene(*size, count, seed) for seed in (11, 12)]
    paths = []
    for number, made in enumerate(scenes):
        paths.append(folder / f"faces-{number}.png")
        cv2.imwrite(str(paths[-1]), made.image)
    env = {"TILEREC_ALLOWED_ROOTS": str(folder), "TILEREC_MODEL_DIR": str(MODELS)}
    options = {"identify": "bench", "identity_repeats": True}
    rows: list[dict[str, Any]] = []
    with Cluster(workers, out, env) as cluster:
        assert cluster.app is not None
        for name, photo in ENROLLED:
            cluster.app.send_task("tilerec.gallery_add", args=[name, [str(folder / photo)]],
                                  kwargs={"gallery": "bench"}).get(timeout=300)  # fmt: skip
        from tasks.gallery import load

        alternative = WholeImage(load(cluster.client(), "bench"))
        cluster.warm(str(paths[0]), "faces-dnn", options, 600)
        alternative(scenes[0].image)
        for rep in range(reps):
            for number, (made, path) in enumerate(zip(scenes, paths, strict=True)):
                sides = ["tilerec", "whole"] if (rep + number) % 2 == 0 else ["whole", "tilerec"]
                row: dict[str, Any] = {"rep": rep, "scene": path.name, "faces": len(made.truths)}
                for side in sides:
                    load_before = os.getloadavg()[0]
                    if side == "tilerec":
                        job = cluster.run(str(path), "faces-dnn", options, 600)
                        if job.error:
                            raise RuntimeError(f"tilerec failed on {path.name}: {job.error}")
                        seconds = job.wall_s
                        found = [(d["box"], (d.get("data") or {}).get("identity")) for d in job.result["detections"]]
                    else:
                        image = cv2.imread(str(path))  # read as the job reads it: the file, decoded
                        began = time.perf_counter()
                        found = alternative(image)
                        seconds = time.perf_counter() - began
                    row[side] = {"seconds": round(seconds, 3), "load": round(load_before, 2),
                                 **score(found, made.truths)}  # fmt: skip
                rows.append(row)
                print(f"rep {rep} {path.name}: tilerec {row['tilerec']['seconds']:.2f} s, whole image "
                      f"{row['whole']['seconds']:.2f} s", file=sys.stderr)  # fmt: skip
    return summarize(rows, size, count, workers)


def summarize(rows: list[dict[str, Any]], size: tuple[int, int], count: int, workers: int) -> dict[str, Any]:
    summary: dict[str, Any] = {"size": f"{size[0]}x{size[1]}", "faces_per_scene": count, "workers": workers,
                               "cpus": os.cpu_count(), "rows": rows}  # fmt: skip
    for side in ("tilerec", "whole"):
        seconds = statistics.median(row[side]["seconds"] for row in rows)
        summary[side] = {
            "median_s": round(seconds, 3),
            "faces_per_s": round(count / seconds, 2),
            "found": f"{sum(r[side]['found'] for r in rows)}/{sum(r['faces'] for r in rows)}",
            "named_right": f"{sum(r[side]['named_right'] for r in rows)}/{sum(r['faces'] for r in rows)}",
            "extra": sum(r[side]["extra"] for r in rows),
            "load": [min(r[side]["load"] for r in rows), max(r[side]["load"] for r in rows)],
        }
    summary["ratio_whole_over_tilerec"] = round(summary["whole"]["median_s"] / summary["tilerec"]["median_s"], 2)
    return summary


def markdown(summary: dict[str, Any]) -> str:
    lines = [
        f"{summary['size']}, {summary['faces_per_scene']} faces a scene, W={summary['workers']}, "
        f"{summary['cpus']} CPUs",
        "",
        "| side | median s | faces/s | found | named right | extra | load (1 min) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for side, title in (("tilerec", f"tilerec W={summary['workers']}"), ("whole", "one process, whole image")):
        s = summary[side]
        lines.append(f"| {title} | {s['median_s']} | {s['faces_per_s']} | {s['found']} | {s['named_right']} | "
                     f"{s['extra']} | {s['load'][0]}–{s['load'][1]} |")  # fmt: skip
    lines += ["", f"whole image / tilerec time: {summary['ratio_whole_over_tilerec']}"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.faces", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="4000x3000", help="scene size WxH (default 4000x3000)")
    parser.add_argument("--faces", type=int, default=24, help="faces a scene (default 24)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions (default 3)")
    parser.add_argument("--out", default="bench-out/faces", help="output folder (default bench-out/faces)")
    args = parser.parse_args()
    width, _, height = args.size.partition("x")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = run((int(width), int(height)), args.faces, args.workers, args.reps, out)
    (out / "faces.json").write_text(json.dumps(summary, indent=2))
    (out / "faces.md").write_text(markdown(summary))
    print(markdown(summary))


if __name__ == "__main__":
    main()
