"""`segbatch export` and `segbatch report` of an output that lives on `s3://`, to its default places there
(moto's S3 server as a separate process), and one wording for an output folder that cannot be read.

The outputs on S3 are the real job outputs of tests/prelabel.py, uploaded with their images and label
maps, and their committed rows pointed at the uploaded copies (`uri`, `mask_uri`), as a job writing to
the bucket would have committed them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from segbatch.cli import main
from segbatch.storage import filesystem
from tests.conftest import moto_server_process
from tests.prelabel import SCENES, ShapesOutputs
from tests.test_export import _fingerprint, _key, expected_masks

BUCKET = "prelabel-s3"
REPO = Path(__file__).resolve().parents[1]


def _upload_output(local: Path, images: Path, task: str) -> str:
    """The output under s3://BUCKET/<task>, its rows pointing at the images and masks in the bucket."""
    fs, _ = filesystem(f"s3://{BUCKET}")
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
        fs.put(str(images), f"{BUCKET}/images", recursive=True)
    root = f"s3://{BUCKET}/{task}"
    if (local / "masks").exists():
        fs.put(str(local / "masks"), f"{BUCKET}/{task}/masks", recursive=True)
    for part in sorted((local / "metadata").glob("*.parquet")):
        table = pq.read_table(part)
        uri = pc.replace_substring(table["uri"], str(images), f"s3://{BUCKET}/images")
        table = table.set_column(table.schema.get_field_index("uri"), "uri", uri)
        masks = pc.replace_substring(table["mask_uri"], str(local), root)
        table = table.set_column(table.schema.get_field_index("mask_uri"), "mask_uri", masks)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        fs.pipe_file(f"{BUCKET}/{task}/metadata/{part.name}", sink.getvalue().to_pybytes())
    fs.invalidate_cache()
    return root


@pytest.mark.parametrize("task", ["semantic", "instance"])
def test_export_and_report_of_an_output_on_s3(shapes_outputs: ShapesOutputs, s3_env: str, tmp_path: Path, task: str) -> None:
    from pycocotools.coco import COCO

    local = getattr(shapes_outputs, task)
    root = _upload_output(local, shapes_outputs.images, task)
    fs, _ = filesystem(root)
    rows = pq.read_table(fs.open(f"{BUCKET}/{task}/metadata/" + next((local / "metadata").glob("*.parquet")).name))
    assert all(u.startswith(f"s3://{BUCKET}/images/") for u in rows["uri"].to_pylist())
    if task == "semantic":
        assert all(m is None or m.startswith(f"{root}/masks/") for m in rows["mask_uri"].to_pylist())

    for fmt in ("coco", "cvat", "labelstudio"):
        assert main(["export", root, "--format", fmt]) == 0
    assert main(["report", root]) == 0
    fs.invalidate_cache()

    # COCO, read back from the bucket through pycocotools: every mask pixel-exact.
    (tmp_path / "instances.json").write_bytes(fs.cat_file(f"{BUCKET}/{task}/exports/coco/instances.json"))
    coco = COCO(str(tmp_path / "instances.json"))
    assert len(coco.getImgIds()) == SCENES
    got: dict[str, list[tuple[int, str]]] = {}
    for image in coco.loadImgs(coco.getImgIds()):
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]]))
        got[_key(image["file_name"])] = sorted(_fingerprint(a["category_id"], coco.annToMask(a)) for a in anns)
    want = {k: sorted(c.elements()) for k, c in expected_masks(local).items()}
    assert got == want and sum(len(v) for v in want.values()) >= 15
    assert fs.exists(f"{BUCKET}/{task}/exports/coco/review.parquet")
    assert fs.exists(f"{BUCKET}/{task}/exports/cvat/task-00001.zip")
    tasks = json.loads(fs.cat_file(f"{BUCKET}/{task}/exports/labelstudio/tasks.json"))
    assert len(tasks) == SCENES
    assert all(t["data"]["image"].startswith(f"s3://{BUCKET}/images/") for t in tasks)  # a source storage serves them

    # The report: index.html, and every overlay it links to, in the bucket; overlays drawn on the real images.
    page = fs.cat_file(f"{BUCKET}/{task}/report/index.html").decode()
    overlays = re.findall(r'<img src="(overlays/[^"]+\.png)"', page)
    assert len(overlays) == SCENES
    for name in overlays:
        assert fs.exists(f"{BUCKET}/{task}/report/{name}")
    first = re.search(r"#1 · ([^ ]+) ·", page)
    assert first is not None
    source = np.asarray(Image.open(shapes_outputs.images / first.group(1)).convert("RGB")).astype(int)
    (tmp_path / "overlay.png").write_bytes(fs.cat_file(f"{BUCKET}/{task}/report/{overlays[0]}"))
    overlay = np.asarray(Image.open(tmp_path / "overlay.png").convert("RGB")).astype(int)
    assert overlay.shape == source.shape
    # Outside the masks the overlay is the image itself (a grey canvas would mean it was not read).
    assert np.mean(np.abs(overlay - source).max(axis=2) == 0) > 0.3
    assert np.abs(overlay - 128).max() > 60


@pytest.fixture()
def strict_moto() -> Iterator[str]:
    """A moto server that checks credentials (moto accepts any keys unless told otherwise)."""
    with moto_server_process({"INITIAL_NO_AUTH_ACTION_COUNT": "0"}) as url:
        yield url


def test_unreadable_output_is_worded_alike_by_plan_export_and_report(strict_moto: str, tmp_path: Path) -> None:
    output = "s3://any-bucket/out"
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({
        "name": "unreadable-output",
        "input": {"uri": str(tmp_path / "images")},
        "model": {"task": "instance", "weights": "builtin:shapes"},
        "output": {"uri": output},
    }))
    secret = "not-the-right-secret-0123456789"
    env = {**os.environ, "AWS_ENDPOINT_URL": strict_moto, "AWS_ACCESS_KEY_ID": "AKIAWRONGKEY000000",
           "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": "us-east-1", "PYTHONPATH": str(REPO)}
    segbatch = [sys.executable, "-c", "from segbatch.cli import entry; entry()"]  # this checkout's code, as the console script
    lines = {}
    for command in (["plan", str(job)], ["export", output, "--format", "coco"], ["report", output]):
        proc = subprocess.run([*segbatch, *command], cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
        assert proc.returncode == 1, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr and secret not in proc.stderr + proc.stdout
        err = [ln for ln in proc.stderr.splitlines() if ln.startswith("segbatch:")]
        assert len(err) == 1 and err[0] == proc.stderr.strip().splitlines()[-1], proc.stderr
        lines[command[0]] = err[0]
    expected = (
        f"segbatch: job failed: cannot read the outputs under '{output}': InvalidAccessKeyId while reading at "
        f"{strict_moto} (AWS_ENDPOINT_URL): check credentials"
    )
    assert lines["plan"].startswith(expected), lines
    assert lines["export"] == lines["plan"] and lines["report"] == lines["plan"], lines
