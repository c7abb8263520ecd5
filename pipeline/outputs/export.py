"""COCO export of recognitions, so results load in COCO tools (pycocotools' `loadRes`, FiftyOne, CVAT, …).

Two shapes: `coco_results` is COCO's detection *results* format (a list of image_id, category_id, bbox, score);
`coco_document` wraps the same records as a dataset-style document with its `images` and `categories` lists, which
is what most tools want when no ground-truth file exists. Boxes are [x, y, width, height] in pixels, like tilerec's.

Where a detection has them, its record also carries `segmentation` (COCO polygons, or compressed RLE for a mask
with holes, which polygons cannot express), `keypoints` with `num_keypoints` and `keypoint_scores`, and the
non-COCO fields `obb`, `class_id` and `data`; a box-only detection's record is just the four fields above.

GeoJSON export (`geojson_document`): one polygon feature per detection, on the map of a georeferenced raster.

Text export (`plain_text`, `hocr_document`): the detections that carry a text (the `text` recognizer's lines, also QR
payloads), in the order the result lists them (the `text` recognizer's: reading order), grouped by their `column`
and `block` data where they have them; hOCR as OCR tools read it (ocrmypdf's hocrtransform, hocr-tools).

Video results: MOTChallenge text (`mot_lines`), and JSON lines per frame (`frame_lines`).
"""

from __future__ import annotations

import json
import math
import re
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from shapely.geometry.base import BaseGeometry

from pipeline.model import Detections, Recognition, map_points
from pipeline.shapes import COCO_KEYPOINTS, COCO_SKELETON, encode_rle, obb_corners, rasterize, rings_of

SUPERCATEGORY = "tilerec"


def category_ids(labels: Iterable[str]) -> dict[str, int]:
    """Labels to COCO category ids, numbered from 1 in sorted order (COCO keeps 0 for 'no object')."""
    return {label: number for number, label in enumerate(sorted(set(labels)), start=1)}


def skeleton(names: Sequence[str]) -> list[list[int]]:
    """COCO's `skeleton` for keypoints of these names: the person skeleton when they are COCO's 17, else none.

    Args:
        names: the keypoint names, in order.

    Returns:
        1-based index pairs of the keypoints to join, as COCO writes them; [] when no skeleton is known.
    """
    return [list(pair) for pair in COCO_SKELETON] if tuple(names) == COCO_KEYPOINTS else []


def categories(
    ids: Mapping[str, int], keypoint_names: Mapping[str, Sequence[str]] | None = None
) -> list[dict[str, Any]]:
    """COCO's category list for a label-to-id mapping, by id.

    Args:
        ids: label to category id.
        keypoint_names: label to the names of its keypoints, for the labels whose detections have keypoints; those
            categories get COCO's `keypoints` and `skeleton` fields.

    Returns:
        One dict per category: id, name, supercategory (and keypoints, skeleton).
    """
    keypoint_names = keypoint_names or {}
    listed = []
    for label, number in sorted(ids.items(), key=lambda item: item[1]):
        category: dict[str, Any] = {"id": number, "name": label, "supercategory": SUPERCATEGORY}
        if label in keypoint_names:
            category.update(keypoints=list(keypoint_names[label]), skeleton=skeleton(keypoint_names[label]))
        listed.append(category)
    return listed


def mask_crop(mask: BaseGeometry, width: int, height: int) -> tuple[int, int, int, int]:
    """The pixels of a `width`×`height` image that a mask's bounds cover, as the crop x, y, w, h: at least one
    pixel, so a mask with nothing inside the image still has a (then empty) crop.

    Args:
        mask: a shapely (Multi)Polygon in image coordinates.
        width, height: the image's size.

    Returns:
        (x, y, w, h) of the crop, inside the image.
    """
    x1, y1, x2, y2 = mask.bounds
    left = int(np.clip(math.floor(x1), 0, width - 1))
    top = int(np.clip(math.floor(y1), 0, height - 1))
    right = int(np.clip(math.ceil(x2), left + 1, width))
    bottom = int(np.clip(math.ceil(y2), top + 1, height))
    return left, top, right - left, bottom - top


def segmentation(mask: BaseGeometry, width: int, height: int, ndigits: int = 2) -> list[list[float]] | dict[str, Any]:
    """COCO's `segmentation` of a mask in a `width`×`height` image.

    Args:
        mask: a shapely (Multi)Polygon in image coordinates.
        width, height: the image's size (an RLE covers the whole image).
        ndigits: decimals kept in polygon coordinates.

    Returns:
        Polygons, one flat [x1, y1, x2, y2, ...] per part, when no part has a hole; else compressed RLE
        {"size": [height, width], "counts": str}: COCO fills every polygon, so holes need RLE. The RLE is encoded
        from the mask's bounding-box crop, never a full-image bitmap.
    """
    parts = getattr(mask, "geoms", [mask])
    if not any(len(part.interiors) for part in parts):
        return [np.round(np.asarray(part.exterior.coords)[:-1], ndigits).reshape(-1).tolist() for part in parts]
    x, y, w, h = mask_crop(mask, width, height)
    return encode_rle(rasterize(mask, x, y, w, h), x, y, height, width)


def coco_keypoints(keypoints: np.ndarray, ndigits: int = 2) -> dict[str, Any]:
    """COCO's keypoint fields of one detection's (K, 3) keypoints (x, y, score).

    Args:
        keypoints: (K, 3) rows of x, y and score (or visibility).
        ndigits: decimals kept in coordinates.

    Returns:
        `keypoints`, flat [x, y, v, ...] with COCO's visibility v = 2 (labelled and visible) where the score is
        above 0, else 0 (not labelled; the coordinates are kept as found); `num_keypoints`, the count of v = 2;
        `keypoint_scores`, the scores themselves, which COCO's v cannot hold.
    """
    visible = keypoints[:, 2] > 0
    flat = [value for (x, y, _), seen in zip(keypoints, visible, strict=True)
            for value in (round(float(x), ndigits), round(float(y), ndigits), 2 if seen else 0)]  # fmt: skip
    return {
        "keypoints": flat,
        "num_keypoints": int(visible.sum()),
        "keypoint_scores": np.round(keypoints[:, 2], 4).tolist(),
    }


def _extras(detections: Detections, i: int, width: int, height: int, ndigits: int) -> dict[str, Any]:
    """Detection i's optional fields for its COCO record: only those it has."""
    extra: dict[str, Any] = {}
    if detections.masks[i] is not None:
        extra["segmentation"] = segmentation(detections.masks[i], width, height, ndigits)
    if detections.keypoints[i] is not None:
        extra.update(coco_keypoints(detections.keypoints[i], ndigits))
    if not np.isnan(detections.obb[i, 0]):
        *center_size, angle = detections.obb[i]
        extra["obb"] = [*np.round(center_size, ndigits).tolist(), round(float(angle), 3)]
    if detections.class_id[i] >= 0:
        extra["class_id"] = int(detections.class_id[i])
    values = {key: column[i] for key, column in detections.data.items() if column[i] is not None}
    if values:
        extra["data"] = values
    return extra


def _labels(recognitions: Iterable[Recognition]) -> list[str]:
    return [str(label) for recognition in recognitions for label in recognition.detections.labels]


def coco_results(
    recognition: Recognition, image_id: int, ids: Mapping[str, int], ndigits: int = 2
) -> list[dict[str, Any]]:
    """One image's detections in COCO's results format (with `segmentation`, `keypoints` and tilerec's extra fields
    where a detection has them). A label missing from `ids` is an error, not a silent drop."""
    detections = recognition.detections
    records = []
    for i in range(len(detections)):
        label = str(detections.labels[i])
        if label not in ids:
            raise KeyError(f"label {label!r} has no COCO category id (known: {', '.join(sorted(ids)) or 'none'})")
        x1, y1, x2, y2 = (float(v) for v in detections.xyxy[i])
        records.append(
            {
                "image_id": image_id,
                "category_id": ids[label],
                "bbox": [round(x1, ndigits), round(y1, ndigits), round(x2 - x1, ndigits), round(y2 - y1, ndigits)],
                "score": round(float(detections.scores[i]), 4),
                **_extras(detections, i, recognition.width, recognition.height, ndigits),
            }
        )
    return records


def keypoint_names_by_label(recognitions: Iterable[Recognition]) -> dict[str, tuple[str, ...]]:
    """The keypoint names of each label whose detections have keypoints (named by index, "0", "1", …, when the
    recognizer gave no names).

    Raises:
        ValueError: a label's keypoints are named differently in two recognitions.
    """
    names: dict[str, tuple[str, ...]] = {}
    for recognition in recognitions:
        detections = recognition.detections
        for label, keypoints in zip(detections.labels, detections.keypoints, strict=True):
            if keypoints is None:
                continue
            found = detections.keypoint_names or tuple(str(k) for k in range(len(keypoints)))
            if names.setdefault(str(label), found) != found:
                raise ValueError(f"label {label!r} has keypoints named {names[str(label)]} and {found}")
    return names


def coco_document(
    recognitions: Sequence[Recognition],
    file_names: Sequence[str] | None = None,
    labels: Sequence[str] | None = None,
    image_ids: Sequence[int] | None = None,
    ids: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """A COCO document for several images: `images`, `categories` and `annotations` (each with its `score`).

    Image ids are `image_ids` (a dataset's), else 1, 2, … in the order given. `ids` (a dataset's category ids by
    name) or else `labels` fixes the category list (and so its ids) across runs; without either the categories
    are the labels found. Decoded payloads go in each annotation's `text`. An annotation's `area` is its mask's
    area when it has a mask, else its box's; categories whose detections have keypoints list their names and
    skeleton.
    """
    for given, what in ((file_names, "file names"), (image_ids, "image ids")):
        if given is not None and len(given) != len(recognitions):
            raise ValueError(f"{len(given)} {what} for {len(recognitions)} recognitions")
    ids = dict(ids) if ids is not None else category_ids(labels if labels is not None else _labels(recognitions))
    numbers = image_ids if image_ids is not None else range(1, len(recognitions) + 1)
    images, annotations = [], []
    for index, (image_id, recognition) in enumerate(zip(numbers, recognitions, strict=True)):
        name = file_names[index] if file_names is not None else recognition.source
        images.append({"id": image_id, "file_name": name, "width": recognition.width, "height": recognition.height})
        texts, masks = recognition.detections.texts, recognition.detections.masks
        for k, record in enumerate(coco_results(recognition, image_id, ids)):
            width, height = record["bbox"][2:]
            area = width * height if masks[k] is None else float(masks[k].area)
            extra = {"text": texts[k]} if texts[k] is not None else {}
            annotations.append({"id": len(annotations) + 1, **record, "area": round(area, 2), "iscrowd": 0, **extra})
    return {
        "info": {"description": "tilerec detection results"},
        "images": images,
        "categories": categories(ids, keypoint_names_by_label(recognitions)),
        "annotations": annotations,
    }


def geometry_rings(detections: Detections, i: int) -> list[list[np.ndarray]]:
    """A detection's outline in pixels: its mask's polygons (holes too), else its oriented box, else its box.

    Args:
        detections: the detections.
        i: which one.

    Returns:
        Polygons, each a list of rings ((n, 2) arrays, exterior first, not closed).
    """
    if detections.masks[i] is not None:
        return [[np.asarray(ring, dtype=np.float64) for ring in polygon] for polygon in rings_of(detections.masks[i])]
    if detections.with_obb()[i]:
        return [[obb_corners(detections.obb[i])[0]]]
    x1, y1, x2, y2 = detections.xyxy[i]
    return [[np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]], dtype=np.float64)]]


def _geometry(polygons: list[list[np.ndarray]], place: Any, ndigits: int) -> dict[str, Any]:
    """GeoJSON geometry of pixel polygons placed by `place` ((n, 2) pixels to coordinates); rings closed and
    wound as RFC 7946 asks (exterior counter-clockwise, holes clockwise, in a y-up map)."""
    shaped = []
    for polygon in polygons:
        rings = []
        for k, ring in enumerate(polygon):
            coords = place(ring)
            area = float(np.sum(coords[:, 0] * np.roll(coords[:, 1], -1) - np.roll(coords[:, 0], -1) * coords[:, 1]))
            if (area < 0) == (k == 0):  # exterior clockwise or hole counter-clockwise: reverse
                coords = coords[::-1]
            rings.append(np.round(np.vstack([coords, coords[:1]]), ndigits).tolist())
        shaped.append(rings)
    if len(shaped) == 1:
        return {"type": "Polygon", "coordinates": shaped[0]}
    return {"type": "MultiPolygon", "coordinates": shaped}


def geojson_features(
    recognition: Recognition, image: str | None = None, to_wgs84: bool = False, ndigits: int | None = None
) -> list[dict[str, Any]]:
    """One GeoJSON Feature per detection: its outline (`geometry_rings`) in the raster's CRS (or EPSG:4326 with
    `to_wgs84`), its fields (label, score, text, class_id, data, box in pixels, …) as properties.

    A recognition without a geotransform (pixels only) gives its outlines in level-0 pixels, y down.

    Args:
        recognition: the result.
        image: a name for the `image` property (several images in one collection); None: no such property.
        to_wgs84: reproject to longitude/latitude (rasterio.warp.transform_geom), as RFC 7946 prefers.
        ndigits: decimals kept; by default 9 for degrees, 3 for map units, 2 for pixels.

    Returns:
        The features.
    """
    spatial = recognition.spatial
    transform = spatial.transform if spatial is not None else None
    if to_wgs84 and (transform is None or spatial.crs is None):
        raise ValueError(f"{recognition.source or 'the image'} has no CRS: it cannot be reprojected to EPSG:4326")
    digits = ndigits if ndigits is not None else 9 if to_wgs84 else 3 if transform is not None else 2
    scale = recognition.downsample

    def place(points: np.ndarray) -> np.ndarray:
        return map_points(transform, scale, points) if transform is not None else points * scale

    detections, records = recognition.detections, recognition.to_json()["detections"]
    features = []
    for i, record in enumerate(records):
        properties = {key: value for key, value in record.items() if key not in ("mask", "obb", "keypoints", "points")}
        if image is not None:
            properties["image"] = image
        geometry = _geometry(geometry_rings(detections, i), place, 12 if to_wgs84 else digits)
        if to_wgs84:
            geometry = _to_wgs84(geometry, spatial.crs, digits)
        features.append({"type": "Feature", "geometry": geometry, "properties": properties})
    return features


def _to_wgs84(geometry: dict[str, Any], crs: str, ndigits: int) -> dict[str, Any]:
    from rasterio.warp import transform_geom

    moved = transform_geom(crs, "EPSG:4326", geometry)
    return {"type": moved["type"], "coordinates": _rounded(moved["coordinates"], ndigits)}


def _rounded(value: Any, ndigits: int) -> Any:
    if isinstance(value, list | tuple):
        return [_rounded(v, ndigits) for v in value]
    return round(float(value), ndigits)


def geojson_document(
    recognitions: Sequence[Recognition], images: Sequence[str] | None = None, to_wgs84: bool = False
) -> dict[str, Any]:
    """A GeoJSON FeatureCollection of the recognitions' detections (`geojson_features`).

    Without `to_wgs84` the coordinates are in the rasters' CRS, named (GDAL and QGIS read it) by the legacy `crs`
    member when every image has the same EPSG code.

    Args:
        recognitions: the results, one per image.
        images: their names, for each feature's `image` property when there are several.
        to_wgs84: reproject to EPSG:4326.

    Returns:
        The FeatureCollection.
    """
    names = list(images) if images is not None and len(recognitions) > 1 else [None] * len(recognitions)
    features = [f for r, name in zip(recognitions, names, strict=True) for f in geojson_features(r, name, to_wgs84)]
    collection: dict[str, Any] = {"type": "FeatureCollection", "features": features}
    codes = {
        r.spatial.epsg if r.spatial is not None and r.spatial.transform is not None else None for r in recognitions
    }
    if not to_wgs84 and len(codes) == 1 and (code := codes.pop()) is not None:
        collection["crs"] = {"type": "name", "properties": {"name": f"urn:ogc:def:crs:EPSG::{code}"}}
    return collection


# what XML 1.0 cannot carry: C0 controls but tab, line feed and carriage return; lone surrogates (a str from bytes
# decoded with surrogateescape has them); the two non-characters U+FFFE and U+FFFF
XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
HOCR_CAPABILITIES = "ocr_page ocr_carea ocr_par ocr_line ocrx_word"


def xml_safe(text: str) -> str:
    """`text` with every character XML cannot hold replaced by U+FFFD (markup is escaped by the serializer)."""
    return XML_INVALID.sub("\ufffd", text)


def text_blocks(detections: Detections) -> list[list[list[int]]]:
    """The detections that carry a text, in their order, as columns of blocks of rows: consecutive detections with
    the same `column` and `block` data are one block (without that data, each is a block and a column of its own).

    Returns:
        [[[row, ...] block, ...] column, ...].
    """
    columns: list[list[list[int]]] = []
    previous: tuple[Any, Any] | None = None
    for i in range(len(detections)):
        if not str(detections.texts[i] or "").strip():
            continue
        column, block = (detections.data.get(name, [None] * len(detections))[i] for name in ("column", "block"))
        key = (column, block) if column is not None and block is not None else None
        if key is None or previous is None or key[0] != previous[0]:
            columns.append([[i]])
        elif key[1] != previous[1]:
            columns[-1].append([i])
        else:
            columns[-1][-1].append(i)
        previous = key
    return columns


def plain_text(recognitions: Sequence[Recognition]) -> str:
    """The text of each recognition in order (`text_blocks`): a line per detection, a blank line between blocks and
    columns; pages separated by a form feed, as Tesseract writes them."""
    pages = []
    for recognition in recognitions:
        texts = recognition.detections.texts
        blocks = [block for column in text_blocks(recognition.detections) for block in column]
        pages.append("\n\n".join("\n".join(" ".join(str(texts[i]).split()) for i in block) for block in blocks))
    return "\f".join(page + "\n" if page else "" for page in pages)


def _bbox(points: np.ndarray) -> str:
    """hOCR's `bbox x0 y0 x1 y1` (whole pixels) around points (n, 2)."""
    x0, y0 = np.floor(points.min(axis=0)).astype(int).tolist()
    x1, y1 = np.ceil(points.max(axis=0)).astype(int).tolist()
    return f"bbox {x0} {y0} {x1} {y1}"


def line_quad(detections: Detections, i: int) -> np.ndarray:
    """(4, 2) corners of a text detection along its reading direction: top-left, top-right, bottom-right,
    bottom-left of its oriented box, else of its box."""
    if detections.with_obb()[i]:
        return obb_corners(detections.obb[i])[0]
    x1, y1, x2, y2 = detections.xyxy[i]
    return np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]], dtype=np.float64)


def word_quads(text: str, quad: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """The words of a line and each one's part of the line's quad, by its share of the line's characters (OCR
    models give no box per word; the share is close for proportional fonts).

    Args:
        text: the line's text.
        quad: the line's corners (`line_quad`).

    Returns:
        (word, (4, 2) corners) per word, in order.
    """
    count = max(1, len(text))
    top, bottom = quad[1] - quad[0], quad[2] - quad[3]
    found = []
    for match in re.finditer(r"\S+", text):
        start, stop = match.start() / count, match.end() / count
        corners = np.array(
            [quad[0] + start * top, quad[0] + stop * top, quad[3] + stop * bottom, quad[3] + start * bottom]
        )
        found.append((match.group(), corners))
    return found


def _hocr_page(body: ElementTree.Element, recognition: Recognition, page: int, image: str | None) -> None:
    """One ocr_page of a recognition, appended to `body`."""
    detections = recognition.detections
    name = xml_safe(image or recognition.source or f"page {page}").replace('"', "")
    size = f"bbox 0 0 {recognition.width} {recognition.height}"
    scores = detections.data.get("text_score", detections.scores)
    counters = {"block": 0, "par": 0, "line": 0, "word": 0}

    def node(parent: ElementTree.Element, tag: str, kind: str, counter: str, title: str) -> ElementTree.Element:
        counters[counter] += 1
        return ElementTree.SubElement(parent, tag, {"class": kind, "id": f"{counter}_{page}_{counters[counter]}",
                                                    "title": title})  # fmt: skip

    element = ElementTree.SubElement(body, "div", {"class": "ocr_page", "id": f"page_{page}",
                                                   "title": f'image "{name}"; {size}; ppageno {page - 1}'})  # fmt: skip
    for column in text_blocks(detections):
        quads = {i: line_quad(detections, i) for block in column for i in block}
        area = node(element, "div", "ocr_carea", "block", _bbox(np.concatenate(list(quads.values()))))
        for block in column:
            paragraph = node(area, "p", "ocr_par", "par", _bbox(np.concatenate([quads[i] for i in block])))
            for i in block:
                text = xml_safe(" ".join(str(detections.texts[i]).split()))
                height = float(np.linalg.norm(quads[i][3] - quads[i][0]))
                angle = -float(detections.obb[i, 4]) % 360 if detections.with_obb()[i] else 0.0
                title = f"{_bbox(quads[i])}; x_size {height:.1f}" + (f"; textangle {angle:.1f}" if angle else "")
                line = node(paragraph, "span", "ocr_line", "line", title)
                confidence = round(100 * float(scores[i] if scores[i] is not None else 0.0))
                for word, corners in word_quads(text, quads[i]):
                    node(line, "span", "ocrx_word", "word", f"{_bbox(corners)}; x_wconf {confidence}").text = word


def hocr_document(recognitions: Sequence[Recognition], images: Sequence[str] | None = None) -> str:
    """An hOCR document (XHTML) of the recognitions' text, one ocr_page each: ocr_carea per column, ocr_par per
    block, ocr_line per line, ocrx_word per word, each with its bbox; every text is XML-escaped and characters XML
    cannot hold are replaced by U+FFFD.

    Args:
        recognitions: the results, one per page.
        images: a name for each page's `image` property; None: each result's source.

    Returns:
        The document, as text (UTF-8 when written).
    """
    html = ElementTree.Element("html", {"xmlns": "http://www.w3.org/1999/xhtml", "xml:lang": "en", "lang": "en"})
    head = ElementTree.SubElement(html, "head")
    ElementTree.SubElement(head, "title").text = "tilerec"
    ElementTree.SubElement(head, "meta", {"http-equiv": "Content-Type", "content": "text/html;charset=utf-8"})
    ElementTree.SubElement(head, "meta", {"name": "ocr-system", "content": "tilerec"})
    ElementTree.SubElement(head, "meta", {"name": "ocr-capabilities", "content": HOCR_CAPABILITIES})
    body = ElementTree.SubElement(html, "body")
    names = list(images) if images is not None else [None] * len(recognitions)
    for page, (recognition, name) in enumerate(zip(recognitions, names, strict=True), start=1):
        _hocr_page(body, recognition, page, name)
    ElementTree.indent(html, space=" ")
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Transitional//EN" '
        '"http://www.w3.org/TR/xhtml1/DTD/xhtml1-transitional.dtd">\n'
        + ElementTree.tostring(html, encoding="unicode")
        + "\n"
    )


def mot_lines(result: dict[str, Any]) -> Iterator[str]:
    """A video result's tracks as MOTChallenge text lines, frame by frame: `frame,id,x,y,w,h,score,-1,-1,-1` with
    1-based frame numbers (the benchmark's convention; tilerec's own are 0-based)."""
    rows = sorted((row[0], track["id"], row) for track in result["tracks"] for row in track["frames"])
    for frame, track, (_, x, y, w, h, score) in rows:
        yield f"{frame + 1},{track},{x:g},{y:g},{w:g},{h:g},{score:g},-1,-1,-1"


def frame_lines(result: dict[str, Any]) -> Iterator[str]:
    """A video result as JSON lines, one per recognized frame: {"frame", "time", "detections"} with each
    detection's `track`."""
    for frame in result["per_frame"]:
        yield json.dumps(frame, separators=(",", ":"))
