import itertools

import numpy as np
import pytest

from pipeline.merge.detections import box_metric, merge_detections, overlapping_pairs, place
from pipeline.model import Detections
from pipeline.tiling import Window


def dets(boxes, scores, labels="face", texts=None, cut=None) -> Detections:
    d = Detections(
        np.array(boxes, dtype=float), scores, [labels] * len(scores) if isinstance(labels, str) else labels, texts
    )
    if cut is not None:
        d.cut = np.array(cut, dtype=bool)
    return d


def test_box_metric_iou_and_ios():
    big = np.array([[0, 0, 100, 100]], dtype=float)
    small = np.array([[10, 10, 30, 30]], dtype=float)  # inside big
    assert box_metric(big, small, "ios")[0] == pytest.approx(1.0)
    assert box_metric(big, small, "iou")[0] == pytest.approx(400 / 10000)
    half = np.array([[50, 0, 150, 100]], dtype=float)
    assert box_metric(big, half, "iou")[0] == pytest.approx(5000 / 15000)
    assert box_metric(big, half, "ios")[0] == pytest.approx(0.5)
    apart = np.array([[200, 200, 210, 210]], dtype=float)
    assert box_metric(big, apart, "iou")[0] == 0


def test_nms_keeps_the_best_of_a_cluster_and_separate_objects():
    d = dets([[0, 0, 100, 100], [5, 5, 105, 105], [500, 500, 540, 540]], [0.6, 0.9, 0.5])
    merged = merge_detections(d, "nms", "iou", 0.5)
    assert merged.xyxy.tolist() == [[5, 5, 105, 105], [500, 500, 540, 540]]
    assert merged.scores.tolist() == [0.9, 0.5]


def test_greedy_nmm_grows_the_kept_box_to_the_union():
    d = dets([[0, 0, 100, 100], [20, 0, 130, 100]], [0.9, 0.8])  # IOS = 80/100... over the smaller area
    merged = merge_detections(d, "greedy_nmm", "ios", 0.5)
    assert merged.xyxy.tolist() == [[0, 0, 130, 100]]
    assert merged.scores.tolist() == [0.9]


def test_ios_matches_a_fragment_inside_a_box_where_iou_does_not():
    d = dets([[0, 0, 100, 100], [0, 0, 30, 100]], [0.9, 0.8])
    assert len(merge_detections(d, "nms", "ios", 0.5)) == 1
    assert len(merge_detections(d, "nms", "iou", 0.5)) == 2


def test_merge_is_class_aware():
    d = dets([[0, 0, 100, 100], [2, 2, 100, 100]], [0.9, 0.8], labels=["face", "person"])
    assert sorted(merge_detections(d).labels) == ["face", "person"]


def test_merge_none_keeps_everything():
    d = dets([[0, 0, 100, 100], [0, 0, 100, 100]], [0.9, 0.8])
    assert len(merge_detections(d, "none")) == 2


def test_payloads_are_deduplicated_by_text_and_position():
    boxes = [[0, 0, 50, 50], [1, 1, 49, 49], [40, 40, 90, 90], [1000, 1000, 1050, 1050]]
    texts = ["A", "A", "B", "A"]
    merged = merge_detections(dets(boxes, [1.0] * 4, "qrcode", texts), "greedy_nmm", "ios", 0.5)
    # the two overlapping "A" are one code; "B" overlaps "A" but is another code; the far "A" is another copy
    assert sorted(zip(merged.texts, merged.xyxy[:, 0], strict=True)) == [("A", 0.0), ("A", 1000.0), ("B", 40.0)]


def test_same_payload_merges_even_below_the_box_threshold():
    # a seam-cut view of a marker and its whole view overlap little, yet carry the same id
    merged = merge_detections(
        dets([[0, 0, 100, 100], [90, 0, 100, 100]], [1.0, 1.0], "aruco", ["7", "7"]), "nms", "iou", 0.9
    )
    assert len(merged) == 1


def test_whole_view_wins_over_a_seam_cut_view_and_is_not_stretched_by_it():
    whole = [500, 100, 600, 200]
    fragment = [540, 95, 602, 205]  # cut at a tile edge, detector box a bit off
    merged = merge_detections(dets([fragment, whole], [0.95, 0.7], cut=[True, False]), "greedy_nmm", "ios", 0.5)
    assert merged.xyxy.tolist() == [whole]
    assert merged.scores.tolist() == [0.95]


def test_cut_views_alone_are_joined_into_the_whole_object():
    left, right = [400, 100, 640, 200], [630, 100, 800, 200]
    merged = merge_detections(dets([left, right], [0.8, 0.9], cut=[True, True]), "greedy_nmm", "ios", 0.05)
    assert merged.xyxy.tolist() == [[400, 100, 800, 200]]


def test_place_shifts_clamps_and_marks_cuts_only_at_inner_edges():
    window = Window(0, 512, 0, 640, 640)  # second column, first row of a 2000x1000 image
    found = dets([[0, 10, 50, 60], [100, 0, 150, 50], [600, 300, 650, 350]], [0.9, 0.9, 0.9])
    placed = place(found, window, width=2000, height=1000)
    assert placed.xyxy.tolist() == [[512, 10, 562, 60], [612, 0, 662, 50], [1112, 300, 1162, 350]]
    # left edge is inner (x=512 > 0): cut; top edge is the image edge: not cut; right edge is inner: cut
    assert placed.cut.tolist() == [True, False, True]
    at_image_edge = place(found, Window(0, 1360, 0, 640, 640), width=2000, height=1000)
    assert at_image_edge.xyxy[:, 2].max() == 2000  # clamped to the image
    assert at_image_edge.cut.tolist() == [True, False, False]


def brute_pairs(xyxy):
    pairs = set()
    for i, j in itertools.combinations(range(len(xyxy)), 2):
        a, b = xyxy[i], xyxy[j]
        if max(a[0], b[0]) < min(a[2], b[2]) and max(a[1], b[1]) < min(a[3], b[3]):
            pairs.add((i, j))
    return pairs


def random_boxes(rng, n, extent=2000, large_share=0.05):
    xy = rng.uniform(0, extent, size=(n, 2))
    sizes = rng.uniform(5, 60, size=(n, 2))
    large = rng.random(n) < large_share
    sizes[large] *= 10
    return np.hstack([xy, xy + sizes])


@pytest.mark.parametrize("seed", range(5))
def test_grid_bucketing_finds_exactly_the_intersecting_pairs(seed):
    xyxy = random_boxes(np.random.default_rng(seed), 400)
    i, j = overlapping_pairs(xyxy)
    assert set(zip(i.tolist(), j.tolist(), strict=True)) == brute_pairs(xyxy)


def reference_merge(d: Detections, method: str, metric: str, threshold: float) -> list[tuple]:
    """Plain O(N²) greedy merge with the documented rules, written independently of pipeline.merge.detections."""
    order = sorted(range(len(d)), key=lambda k: (bool(d.cut[k]), -d.scores[k], k))
    alive = set(order)
    out = []
    for k in order:
        if k not in alive:
            continue
        alive.discard(k)
        box, score = list(d.xyxy[k]), d.scores[k]
        for m in order:
            if m not in alive or d.labels[m] != d.labels[k]:
                continue
            a, b = d.xyxy[k], d.xyxy[m]
            inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
            if d.texts[k] is not None and d.texts[m] is not None:
                same = d.texts[k] == d.texts[m] and inter > 0
            else:
                area_a, area_b = (a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1])
                denominator = min(area_a, area_b) if metric == "ios" else area_a + area_b - inter
                same = inter > 0 and inter / denominator >= threshold
            if same:
                alive.discard(m)
                score = max(score, d.scores[m])
                if method == "greedy_nmm" and (d.cut[k] or not d.cut[m]):
                    box = [min(box[0], b[0]), min(box[1], b[1]), max(box[2], b[2]), max(box[3], b[3])]
        out.append((d.labels[k], d.texts[k], tuple(round(v, 6) for v in box), round(score, 9)))
    return sorted(out, key=str)


@pytest.mark.parametrize(
    ("method", "metric"), [("greedy_nmm", "ios"), ("nms", "iou"), ("greedy_nmm", "iou"), ("nms", "ios")]
)
@pytest.mark.parametrize("seed", range(3))
def test_vectorised_merge_equals_the_slow_reference(method, metric, seed):
    rng = np.random.default_rng(seed)
    n = 500
    xyxy = random_boxes(rng, n, extent=1000)
    labels = rng.choice(["a", "b"], size=n)
    texts = [None if rng.random() < 0.8 else str(rng.integers(0, 5)) for _ in range(n)]
    d = Detections(xyxy, rng.random(n), labels, texts, cut=rng.random(n) < 0.2)
    merged = merge_detections(d, method, metric, 0.3)
    got = sorted(
        (
            (merged.labels[k], merged.texts[k], tuple(round(v, 6) for v in merged.xyxy[k]), round(merged.scores[k], 9))
            for k in range(len(merged))
        ),
        key=str,
    )
    assert got == reference_merge(d, method, metric, 0.3)
    assert len(merged) < n  # the random scene has overlaps, so the test exercises merging


def test_bad_merge_options_are_refused():
    d = dets([[0, 0, 1, 1], [0, 0, 1, 1]], [1, 1])
    with pytest.raises(ValueError, match="merge must be one of"):
        merge_detections(d, "average")
    with pytest.raises(ValueError, match="match_metric"):
        merge_detections(d, "nms", "giou")
