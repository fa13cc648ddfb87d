"""Scene generator: deterministic, truth equal to the painted pixels, occlusion and border rules."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from pycocotools import mask as mask_util

from segbatch.synth import (
    CLASSES,
    MAX_OBJECTS,
    MIN_VISIBLE_FRACTION,
    MIN_VISIBLE_PIXELS,
    SIZE_RANGE,
    Fill,
    circle,
    coco_annotations,
    compose,
    rectangle,
    scene_from_seed,
    shape_mask,
    triangle,
    write_dataset,
    write_scene_folder,
)

SEEDS = range(10_000_000, 10_000_024)


def _flat(h: int, w: int, color: tuple[int, int, int] = (10, 20, 30)) -> np.ndarray:
    return np.broadcast_to(np.asarray(color, np.uint8), (h, w, 3)).copy()


def test_deterministic_for_a_seed() -> None:
    a, b, c = scene_from_seed(123), scene_from_seed(123), scene_from_seed(124)
    assert np.array_equal(a.image, b.image)
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.instances, b.instances)
    assert a.classes == b.classes and a.shapes == b.shapes
    assert a.image.shape != c.image.shape or not np.array_equal(a.image, c.image)


def test_axis_aligned_rectangle_by_hand() -> None:
    # Corners (15, 12) (25, 12) (25, 18) (15, 18): Pillow fills x 15..25, y 12..18 inclusive = 11 x 7.
    scene = compose(_flat(32, 40), [(rectangle(20, 15, 10, 6), Fill("solid", (200, 100, 50)))])
    expected = np.zeros((32, 40), np.uint8)
    expected[12:19, 15:26] = 2
    assert np.array_equal(scene.labels, expected)
    assert np.array_equal(scene.instances > 0, expected > 0)
    assert (scene.image[expected == 2] == (200, 100, 50)).all()
    assert (scene.image[expected == 0] == (10, 20, 30)).all()
    (ann,) = coco_annotations(scene, image_id=1)
    assert ann["area"] == 77 and ann["bbox"] == [15.0, 12.0, 11.0, 7.0]
    assert ann["category_id"] == 2 and ann["iscrowd"] == 0


def test_rotated_rectangle_equals_polygon_fill() -> None:
    shape = rectangle(30.3, 25.7, 30, 9, angle=0.6)
    scene = compose(_flat(50, 60), [(shape, Fill("solid", (255, 255, 255)))])
    ref = Image.new("L", (60, 50), 0)
    ImageDraw.Draw(ref).polygon(list(shape.vertices), fill=1)
    poly = np.asarray(ref) == 1
    assert np.array_equal(scene.labels == 2, poly)
    assert abs(int(poly.sum()) - shape.area()) < 0.25 * shape.area()  # rasterised close to 30 * 9
    (ann,) = coco_annotations(scene, image_id=7)
    assert ann["area"] == int(poly.sum()) == int((scene.labels == 2).sum())


def test_occlusion_truth_is_the_visible_part() -> None:
    bottom = rectangle(20, 20, 20, 20)  # x 10..30, y 10..30 -> 21 x 21 = 441 px
    top = circle(30, 20, 6)
    scene = compose(_flat(40, 48), [(bottom, Fill("solid", (0, 0, 255))), (top, Fill("solid", (255, 0, 0)))])
    top_px = shape_mask(top, 40, 48)
    bottom_px = shape_mask(bottom, 40, 48)
    assert bottom_px.sum() == 441
    assert np.array_equal(scene.instances == 2, top_px)
    assert np.array_equal(scene.instances == 1, bottom_px & ~top_px)
    assert np.array_equal(scene.labels == 1, top_px) and np.array_equal(scene.labels == 2, bottom_px & ~top_px)
    anns = coco_annotations(scene, image_id=1)
    for ann, k in zip(anns, (1, 2)):
        assert ann["area"] == int((scene.instances == k).sum())
        decoded = mask_util.decode({"size": ann["segmentation"]["size"], "counts": ann["segmentation"]["counts"]})
        assert np.array_equal(decoded.astype(bool), scene.instances == k)


def test_triangle_and_border_cut() -> None:
    tri = triangle((-10.0, 5.0), (12.0, 2.0), (4.0, 20.0))
    scene = compose(_flat(24, 24), [(tri, Fill("gradient", (0, 0, 0), (255, 255, 255), angle=0.3))])
    ref = Image.new("L", (24, 24), 0)
    ImageDraw.Draw(ref).polygon(list(tri.vertices), fill=1)
    assert np.array_equal(scene.labels == 3, np.asarray(ref) == 1)
    assert (scene.labels[:, 0] == 3).any()  # cut by the left border


def test_random_scenes_follow_the_rules() -> None:
    sizes, counts, cut = set(), [], 0
    for seed in SEEDS:
        scene = scene_from_seed(seed)
        h, w = scene.labels.shape
        assert SIZE_RANGE[0] <= h <= SIZE_RANGE[1] and SIZE_RANGE[0] <= w <= SIZE_RANGE[1]
        assert scene.image.shape == (h, w, 3) and scene.image.dtype == np.uint8
        assert len(scene.classes) <= MAX_OBJECTS and set(scene.classes) <= {1, 2, 3}
        sizes.add((h, w))
        counts.append(len(scene.classes))
        # The truth is exactly what painting the shapes in order leaves visible.
        ids = np.zeros((h, w), np.uint16)
        for k, shape in enumerate(scene.shapes):
            ids[shape_mask(shape, h, w)] = k + 1
        assert np.array_equal(ids, scene.instances)
        lut = np.asarray([0] + scene.classes, np.uint8)
        assert np.array_equal(scene.labels, lut[scene.instances])
        for k, shape in enumerate(scene.shapes):
            inside = int(shape_mask(shape, h, w).sum())
            visible = int((scene.instances == k + 1).sum())
            assert visible >= MIN_VISIBLE_FRACTION * inside and visible >= MIN_VISIBLE_PIXELS
            assert inside >= 0.5 * shape.area()
            cut += inside < 0.97 * shape.area() and bool(
                (scene.instances[[0, -1], :] == k + 1).any() or (scene.instances[:, [0, -1]] == k + 1).any()
            )
    assert len(sizes) > 10 and min(counts) <= 3 and max(counts) >= 9
    assert cut > 0  # some objects are cut by the border


def test_object_sizes_span_the_range() -> None:
    extents = []
    for seed in SEEDS:
        scene = scene_from_seed(seed)
        for shape in scene.shapes:
            if shape.label == 1:
                extents.append(2 * shape.radius)
            else:
                pts = shape.vertices
                extents.append(max(math.dist(p, q) for p, q in zip(pts, pts[1:] + pts[:1])))
    assert min(extents) >= 12 - 1e-6 and min(extents) < 20
    assert max(extents) > 100


def test_write_dataset_layout_and_truth(tmp_path: Path) -> None:
    images, truth = write_dataset(tmp_path / "ds", count=5, seed=10_000_100)
    coco = json.loads((truth / "instances.json").read_text())
    assert [c["name"] for c in coco["categories"]] == list(CLASSES[1:])
    assert [c["id"] for c in coco["categories"]] == [1, 2, 3]
    files = sorted(p.relative_to(images).as_posix() for p in images.rglob("*") if p.is_file())
    assert sorted(img["file_name"] for img in coco["images"]) == files
    for img in coco["images"]:
        scene = scene_from_seed(img["seed"])
        labels = np.asarray(Image.open(truth / "labels" / f"{img['file_name']}.png"))
        assert np.array_equal(labels, scene.labels)
        assert Image.open(images / img["file_name"]).size == (img["width"], img["height"])
        anns = [a for a in coco["annotations"] if a["image_id"] == img["id"]]
        assert len(anns) == len(scene.classes)
        for a in anns:
            m = mask_util.decode({"size": a["segmentation"]["size"], "counts": a["segmentation"]["counts"].encode()})
            assert int(m.sum()) == a["area"] and (labels[m.astype(bool)] == a["category_id"]).all()
    assert len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"])


def test_write_scene_folder_images_only(tmp_path: Path) -> None:
    paths = write_scene_folder(tmp_path / "imgs", count=3, seed=10_000_200)
    assert [p.relative_to(tmp_path / "imgs").as_posix() for p in paths] == [
        "batch-a/scene-0000.jpg",
        "batch-a/scene-0001.png",
        "batch-b/scene-0002.jpg",
    ]
    assert not (tmp_path / "truth").exists()


def test_hidden_fractions_by_hand() -> None:
    # A 41x21-pixel rectangle (x 10..50, y 10..30) whose right half (x 31..50: 20 of 41 columns) is
    # painted over by a later one; and a rectangle centred on the left border, half outside the image.
    back = rectangle(30, 20, 40, 20)
    front = rectangle(45, 20, 28, 30)  # x 31..59
    edge = rectangle(0, 60, 40, 20)
    scene = compose(_flat(80, 80), [(back, Fill("solid", (200, 0, 0))), (front, Fill("solid", (0, 200, 0))),
                                    (edge, Fill("solid", (0, 0, 200)))])
    anns = coco_annotations(scene, 1)
    assert anns[0]["occluded_fraction"] == pytest.approx(20 / 41, abs=1e-3)
    assert anns[1]["occluded_fraction"] == 0.0 and anns[2]["occluded_fraction"] == 0.0
    assert anns[0]["cut_fraction"] == 0.0 and anns[1]["cut_fraction"] == 0.0
    # In-image pixels x 0..20 by y 50..70 (21 x 21) of a 40 x 20 = 800 px² rectangle.
    assert anns[2]["cut_fraction"] == pytest.approx(1 - 21 * 21 / 800, abs=1e-3)
