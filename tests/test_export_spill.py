"""Exports through the spilled pass 1: the same bytes as the in-memory pass 1 had, whatever the spill size.

The outputs are written straight in the committed schema (no model): several parts, images committed again
by later parts (ok → other objects, ok → error, error → ok), a commit-time tie broken by read order, error
rows, and review priorities with many ties. Each format is exported with the default spill size (all
in memory here) and with a tiny one (several levels of bucket files), and every file must be byte-for-byte
what the in-memory pass 1 of commit 763a99a wrote (`GOLDEN`, its sha256s).
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pycocotools import mask as mask_util

import segbatch.export.items as items_module
from segbatch.export.spill import ExternalSort
from segbatch.export import export_output
from segbatch.masks import encode_png_label_map
from segbatch.outputs import METADATA_SCHEMA, SCHEMA_VERSION, latest_rows, read_rows

SIZE = 48
CLASSES = ["background", "circle", "rectangle", "triangle"]
PART_ROWS = 150
ROWS = 900
START = datetime(2026, 1, 1, tzinfo=timezone.utc)


def _masks(rng: np.random.Generator, count: int) -> list[np.ndarray]:
    """`count` discs and boxes of many sizes (some tiny) on a SIZE×SIZE image."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    out = []
    for k in range(count):
        cx, cy = rng.integers(4, SIZE - 4, 2)
        r = int(rng.integers(2, 14))
        m = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r if k % 2 else (abs(xx - cx) <= r) & (abs(yy - cy) <= r // 2 + 1)
        out.append(m)
    return out


def _write_part(out: Path, task: str, seq: int, idx: list[int], when: datetime, rng: np.random.Generator,
                pool: list[np.ndarray], error_share: float) -> None:
    meta = {b"segbatch.task": task.encode(), b"segbatch.classes": json.dumps(CLASSES).encode(),
            b"segbatch.schema_version": SCHEMA_VERSION.encode()}
    n = len(idx)
    errors = rng.random(n) < error_share
    instances: list[object] = []
    pixels: list[object] = []
    mask_uris: list[object] = []
    for k, i in enumerate(idx):
        if errors[k]:
            instances.append(None)
            pixels.append(None)
            mask_uris.append(None)
            continue
        picks = rng.integers(0, len(pool), int(rng.integers(0, 5)))
        if task == "instance":
            inst = []
            for p in picks:
                rle = mask_util.encode(np.asfortranarray(pool[p].astype(np.uint8)))
                # Scores on a 0.05 grid: many images share a priority, so commit order breaks the ties.
                inst.append({"label": 1 + int(p) % 3, "score": float(np.round(rng.uniform(0.05, 1.0) * 20) / 20),
                             "bbox": [0.0, 0.0, 1.0, 1.0], "area": int(pool[p].sum()),
                             "rle": rle["counts"].decode("ascii"), "detector_bbox": None})
            instances.append(inst)
            pixels.append(None)
            mask_uris.append(None)
        else:
            labels = np.zeros((SIZE, SIZE), np.uint8)
            for p in picks:
                labels[pool[p]] = 1 + int(p) % 3
            path = out / "masks" / f"{seq:02d}-{i:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(encode_png_label_map(labels))
            instances.append(None)
            pixels.append(np.bincount(labels.ravel(), minlength=len(CLASSES)).tolist())
            mask_uris.append(str(path))
    uris = [f"s3://spill-bucket/images/{i // 100:03d}/img-{i:05d}.jpg" for i in idx]
    table = pa.table(
        {
            "item_id": [f"{i:020x}" for i in idx],
            "uri": uris,
            "version": ["1"] * n,
            "rel_key": [u.split("/images/", 1)[1] for u in uris],
            "width": [SIZE] * n,
            "height": [SIZE] * n,
            "status": ["error" if e else "ok" for e in errors],
            "error_class": ["unreadable" if e else None for e in errors],
            "error": [f"test: unreadable {i}" if e else None for e, i in zip(errors, idx)],
            "mask_uri": mask_uris,
            "task": [task] * n,
            "model": ["spill-test"] * n,
            "weights_sha256": ["0" * 64] * n,
            "fingerprint": ["spill0fingerprnt"] * n,
            "run_id": [f"run{seq}"] * n,
            "class_pixels": pixels,
            "num_instances": [None if e else len(x or []) for e, x in zip(errors, instances)],
            "instances": instances,
            "committed_at": [when] * n,
            "layer_disagreement": [None] * n,  # a one-model output
        },
        schema=METADATA_SCHEMA.with_metadata(meta),
    )
    (out / "metadata").mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out / "metadata" / f"part-run{seq}-{seq:05d}.parquet")


def make_output(out: Path, task: str) -> Path:
    """ROWS images in parts of PART_ROWS, then three later parts that commit some images again."""
    rng = np.random.default_rng(20261201)
    pool = _masks(rng, 40)
    seq = 0
    for first in range(0, ROWS, PART_ROWS):
        _write_part(out, task, seq, list(range(first, first + PART_ROWS)), START + timedelta(seconds=seq), rng, pool, 0.05)
        seq += 1
    again = sorted(int(i) for i in rng.choice(ROWS, 120, replace=False))
    _write_part(out, task, seq, again, START + timedelta(days=1), rng, pool, 0.2)  # a later run: some now fail
    # Committed at the same instant as the part before: read later, so these rows win the tie.
    _write_part(out, task, seq + 1, again[:30], START + timedelta(days=1), rng, pool, 0.0)
    # An older commit read last: it must lose to the newer rows of the same images.
    _write_part(out, task, seq + 2, again[30:60], START - timedelta(days=1), rng, pool, 0.0)
    return out


GOLDEN: dict[str, dict[str, str]] = {
    "instance-coco": {
        "instances.json": "d785c14429d84a44f800f45ebd797a5cc31c7f4a37cba4eef7f1dfc9e617edd3",
    },
    "semantic-coco": {
        "instances.json": "61d402de155dc38cd14dd59eb6ebb7c40023a11ed6b2fa589e8aee2bba49e20b",
    },
    "instance-cvat": {
        "task-00001/annotations.xml": "595273b766a25cc96e49b9efff278c032e31b08e748181073757d76c41ccc2b7",
        "task-00001/images.txt": "4fb5b2620d2b0216b90a3803cf67eed8fb6eb137cfe113ade8fc712576537c44",
        "task-00001.zip": "2ed7fef4c3a4d62eab2132cae1e5ac009dbb2d608b7387352c8f0d6207b7a629",
        "task-00002/annotations.xml": "87937c3e302bb4a5416e846071ac78a05499d95c2c77f4b3ce726ce5ea9ebc2f",
        "task-00002/images.txt": "42124d04fc0e39a5a3ca94ec75045f641cd030a1ff55e051e554c8e7cb95843a",
        "task-00002.zip": "649e7fdd8763a3b282943ec0842d28885f981a666ea29856509af5a6bf7827cd",
        "task-00003/annotations.xml": "5cb0387ef8763b1c2b45844812014bd203036ac1d64bd886e019a1888b4128d8",
        "task-00003/images.txt": "f5ddfcf5d7bcc42be6548871bbe07bd10111713804a2b12c8e77ff031ab413f0",
        "task-00003.zip": "9845da4d2e9f2c7ec6ab7d20b352464a892b2678ee6287b1c2000ef93499b026",
        "task-00004/annotations.xml": "82e9f090b5c38d209f0c9fe6959b061667526e3be0e0fcbd5de3e08b9e17b213",
        "task-00004/images.txt": "d91bf952ab0601323cf8f73c6e65c610d66b6327e1bbd1624f83b9618267ed3f",
        "task-00004.zip": "2b2f24bd6f5121533d5ca0df0a91cd6ebe4b7b49c18ca5a05c4796c047b36677",
        "task-00005/annotations.xml": "ed4c6344f96ff7d2b2d7d4bfd3d690054417d5c97c70269ac1bc824aaa8f213e",
        "task-00005/images.txt": "3645e06f72605b2cb8d81aa7eb13e526cc7a6ed80358cf4fb035982e0ca80597",
        "task-00005.zip": "fc3884b155cd9cfed1974cb86862b3c20d6a81b65948e12324c41c0d3346fa8b",
    },
    "semantic-cvat": {
        "task-00001/annotations.xml": "f00e234c4c02efe6b7b77ca9a7880d37d233690d8660e64eb6b331c45d2d84ae",
        "task-00001/images.txt": "ef8cbc2b1be7697efb4a780723691ccf763e22e0a8427064fc9f8ca1c6e3c764",
        "task-00001.zip": "91f6bf9d06a1f72612419213a1dad40a9d20caf3b5db751e32c46636b9eb442e",
        "task-00002/annotations.xml": "ef237037a1d4e21019e9aa1641212d6d811739222a00cff84985e9c173aefe66",
        "task-00002/images.txt": "271c4ca5fcf24528b7ddfebe9bf7faf4a46bbe61877f2c1ce7acead057936432",
        "task-00002.zip": "320501ded462fbd8d3d9031e0f756b1c5612479b7d02e08f97ac984e403d523f",
        "task-00003/annotations.xml": "a309dd7562b374bb9a17991aa6933a024a1d452182436bd82a4534ea78f240b4",
        "task-00003/images.txt": "63484517afadaa55ec5c8ec125b17ffc5f9aecbc92922e5263067d2f5ba85649",
        "task-00003.zip": "4d2fb0602668d55a72b0e51070040648e53dd0d25ac69b17a12ba81303d890d0",
        "task-00004/annotations.xml": "38d39939ac6b487e0e8855dc9b202c571760ff694e190a05c87e05723faee0f5",
        "task-00004/images.txt": "8dfba028d4d8c171db44a383e89fd870e1065260557c77f25361a5b9138906ba",
        "task-00004.zip": "72e6f69d4d9d4741c8f8b7d4db65440290f7890b08e7f247d2f1b95fff8fe91a",
        "task-00005/annotations.xml": "82a29fc988be5546dbd4aace8562b76776755bce4ccab95d7b8be8cce38a619f",
        "task-00005/images.txt": "ac7a765e69a51c085a1f63c50faf1c5dfb8ba6d6bc9195a2e9ee3af27707115b",
        "task-00005.zip": "8659746d9d3f9b62bb09557112ad1dcd3240062c004466ea2d08d54711e18f9f",
    },
    "instance-labelstudio": {
        "labeling_config.xml": "7661e56f04489e2c7015ffa52f5681dfa2af9c963662995f0703d2f53a3d2e43",
        "tasks.json": "2cac4f481f1eafd81dd29363955d5a76e0eb4acf24f9b1ab1e94540651b4f3bf",
    },
    "semantic-labelstudio": {
        "labeling_config.xml": "7661e56f04489e2c7015ffa52f5681dfa2af9c963662995f0703d2f53a3d2e43",
        "tasks.json": "0f3fb493b1d13695284a57eb036ddc72a3ba3673f337ea23c538a4ceb9902bb1",
    },
}


def _digests(folder: Path, output: Path) -> dict[str, str]:
    """sha256 of each file (the output's path, which COCO's `info` names, replaced by a fixed word)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or p.name == "review.parquet":  # Parquet's footer names the writer; compared as a table
            continue
        digest = hashlib.sha256()
        if p.suffix == ".zip":  # entries carry the time they were written: their names and bytes count
            with zipfile.ZipFile(p) as z:
                for name in sorted(z.namelist()):
                    digest.update(name.encode() + b"\0" + z.read(name).replace(str(output).encode(), b"OUTPUT"))
        else:
            digest.update(p.read_bytes().replace(str(output).encode(), b"OUTPUT"))
        out[str(p.relative_to(folder))] = digest.hexdigest()
    return out


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("spill")
    return {task: make_output(root / task, task) for task in ("instance", "semantic")}


def test_the_outputs_have_what_the_comparison_needs(outputs: dict[str, Path]) -> None:
    for task, out in outputs.items():
        assert len(list((out / "metadata").glob("*.parquet"))) == ROWS // PART_ROWS + 3
        rows = read_rows(str(out), None)
        latest = latest_rows(rows).to_pylist()
        assert rows.num_rows - len(latest) >= 100  # superseded rows
        statuses = [r["status"] for r in latest]
        assert 20 <= statuses.count("error") < len(latest) // 4
        ok = [r for r in latest if r["status"] == "ok"]
        if task == "instance":
            labels = {i["label"] for r in ok for i in r["instances"]}
            assert labels == {1, 2, 3} and sum(len(r["instances"]) for r in ok) > 1000
        else:
            assert sum(1 for r in ok if sum(r["class_pixels"][1:]) > 0) > 500


@pytest.mark.parametrize("task", ["instance", "semantic"])
@pytest.mark.parametrize("fmt", ["coco", "cvat", "labelstudio"])
def test_spilled_exports_are_byte_identical(outputs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            fmt: str, task: str) -> None:
    out = outputs[task]
    default = export_output(str(out), fmt, dest=str(tmp_path / "default"), task_size=200, tmp=str(tmp_path))
    assert default["superseded"] >= 100 and default["error_rows"] >= 20
    files = _digests(tmp_path / "default", out)
    if fmt == "cvat":
        assert len([f for f in files if f.endswith(".zip")]) == 5
    monkeypatch.setattr(items_module, "SPILL_RECORDS", 16)  # every sort through several levels of bucket files
    spilled = export_output(str(out), fmt, dest=str(tmp_path / "spilled"), task_size=200, tmp=str(tmp_path))
    assert _digests(tmp_path / "spilled", out) == files
    assert pq.read_table(tmp_path / "spilled" / "review.parquet").equals(pq.read_table(tmp_path / "default" / "review.parquet"))
    for key in ("images", "annotations", "errors", "error_rows", "superseded"):
        assert spilled[key] == default[key]
    assert files == GOLDEN[f"{task}-{fmt}"], json.dumps({f"{task}-{fmt}": files})


@pytest.mark.parametrize("keys", ["uniform", "crowded", "row numbers", "few values"])
def test_external_sort_gives_every_record_back_in_order(tmp_path: Path, keys: str) -> None:
    dtype = np.dtype([("k", "<u8"), ("t", "<i8"), ("row", "<u8")])
    rng = np.random.default_rng(7)
    n = 5000
    records = np.zeros(n, dtype)
    key_range = (0, 2**64 - 1)
    if keys == "uniform":
        records["k"] = rng.integers(0, 2**63, n, dtype=np.uint64) * np.uint64(2)
    elif keys == "crowded":  # like review keys: 40 priorities in the high bits, row numbers below
        records["k"] = ((np.uint64(0xC0000000) + rng.integers(0, 40, n).astype(np.uint64)) << np.uint64(32)) | np.arange(n, dtype=np.uint64)
    elif keys == "row numbers":
        records["k"] = rng.permutation(n).astype(np.uint64)
        key_range = (0, n - 1)
    else:
        records["k"] = rng.integers(0, 3, n).astype(np.uint64)
    records["t"] = rng.integers(-5, 5, n)
    records["row"] = np.arange(n)
    with ExternalSort(dtype, ("k", "t", "row"), str(tmp_path / "sort"), max_records=16, key_range=key_range) as s:
        for chunk in np.array_split(records, 37):
            s.add(chunk)
        assert list((tmp_path / "sort").rglob("*.bin"))  # it spilled
        out = list(s.sorted())
    assert not list((tmp_path / "sort").rglob("*.bin"))
    got = np.concatenate(out)
    assert (got == records[np.lexsort((records["row"], records["t"], records["k"]))]).all()
    assert all(a["k"][-1] < b["k"][0] for a, b in zip(out, out[1:]))  # equal keys never split over arrays
    if keys != "few values":
        assert max(len(a) for a in out) <= 16
