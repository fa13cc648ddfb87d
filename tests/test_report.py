"""`segbatch report`: a static page (no server, no CDN) with counts, scores, errors and a worst-first
gallery of overlays, rendered in a real headless Chromium.

Chromium comes from Debian's `chromium-headless-shell` package (`make test` installs it; playwright's
own browser download does not work offline). Under CI (`CI=true`) a missing browser fails the test;
elsewhere it skips and says how to install it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from segbatch.cli import main
from segbatch.export import export_output
from segbatch.export.geometry import class_color
from segbatch.export.report import ALPHA, draw_overlay
from tests.prelabel import SCENES, ShapesOutputs

CHROMIUM_NAMES = ("chromium-headless-shell", "chromium", "chromium-browser")
INSTALL = "apt-get install -y chromium-headless-shell  (or: make test, which installs it)"


def _chromium() -> str:
    for name in CHROMIUM_NAMES:
        found = shutil.which(name) or (f"/usr/bin/{name}" if os.path.exists(f"/usr/bin/{name}") else None)
        if found:
            return found
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"no headless Chromium on this CI machine ({', '.join(CHROMIUM_NAMES)}): {INSTALL}")
    pytest.skip(f"no headless Chromium installed: {INSTALL}")


def test_overlay_fills_at_half_alpha_with_contours_and_small_objects_on_top() -> None:
    image = np.full((60, 80, 3), 200, np.uint8)
    big = np.zeros((60, 80), bool)
    big[10:50, 10:70] = True
    small = np.zeros((60, 80), bool)
    small[25:35, 30:40] = True
    im = np.asarray(draw_overlay(image, [(big, 1, ""), (small, 2, "")]))
    c1, c2 = np.array(class_color(1)), np.array(class_color(2))
    assert np.abs(im[20, 20] - ((1 - ALPHA) * 200 + ALPHA * c1)).max() <= 1  # inside the big one: blended
    assert (im[10, 40] == c1).all() and (im[11, 40] == c1).all()  # its 2 px contour
    assert (im[25, 35] == c2).all() and (im[30, 35] != c1).any()  # the small one drawn last, on top
    assert (im[0, 0] == 200).all()


@pytest.fixture(scope="module")
def report(shapes_outputs: ShapesOutputs) -> Path:
    assert main(["report", str(shapes_outputs.instance)]) == 0
    return shapes_outputs.instance / "report"


def test_report_is_static_and_worst_first(report: Path, shapes_outputs: ShapesOutputs, tmp_path: Path) -> None:
    page = (report / "index.html").read_text()
    assert not re.search(r"(src|href)=\"(https?:)?//", page) and "<script" not in page  # nothing from a server
    overlays = re.findall(r'<img src="(overlays/[^"]+)"', page)
    assert len(overlays) == SCENES and all((report / o).is_file() for o in overlays)
    for name in ("circle", "rectangle", "triangle"):
        assert name in page
    assert "truncated" in page and "broken.jpg" in page  # the error table
    assert "<svg" in page  # the score histogram
    # Gallery order = the exports' review order.
    export_output(str(shapes_outputs.instance), "coco", dest=str(tmp_path / "coco"))
    review = pq.read_table(tmp_path / "coco" / "review.parquet").to_pylist()
    shown = re.findall(r"<figcaption>#\d+ · ([^ ]+) · priority ([0-9.]+)", page)
    assert [k for k, _ in shown] == [r["rel_key"] for r in review]
    prios = [float(p) for _, p in shown]
    assert prios == sorted(prios, reverse=True)


def test_semantic_report(shapes_outputs: ShapesOutputs, tmp_path: Path) -> None:
    assert main(["report", str(shapes_outputs.semantic), "--dest", str(tmp_path / "r"), "--gallery", "3"]) == 0
    page = (tmp_path / "r" / "index.html").read_text()
    assert len(re.findall(r'<img src="overlays/', page)) == 3 and "carry no score" in page


def test_report_renders_in_headless_chromium(report: Path, tmp_path: Path) -> None:
    chromium = _chromium()
    shot = tmp_path / "shot.png"
    proc = subprocess.run(
        [chromium, "--no-sandbox", "--headless", "--disable-gpu", "--hide-scrollbars", "--virtual-time-budget=5000",
         f"--screenshot={shot}", "--window-size=1200,1600", (report / "index.html").resolve().as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(np.int32)
    assert pixels.shape[:2] == (1600, 1200)
    # The gallery fills the page below the header: overlay contours and "label score" tags are drawn
    # in the exact class colours, far more of them than the legend's and table's swatches.
    gallery = pixels[400:]
    painted = sum(int((np.abs(gallery - np.array(class_color(c))).sum(axis=2) <= 30).sum()) for c in (1, 2, 3))
    assert painted > 5000, painted
    assert (gallery.std(axis=(0, 1)) > 20).all()  # images, not a blank page
