"""Write stage and commit sink called directly (no Ray): mask files, rows, Parquet parts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from segbatch.masks import decode_png_label_map
from segbatch.outputs import METADATA_SCHEMA, read_rows
from segbatch.sinks import Committer, MaskWriter, rows_to_table
from segbatch.spec import OutputSpec

CONSTANTS = {"task": "semantic", "model": "m", "weights_sha256": "abc", "fingerprint": "f1", "run_id": "r1"}


def _batch(n: int, status: list[str]) -> dict[str, np.ndarray]:
    maps = np.empty(n, dtype=object)
    pixels = np.empty(n, dtype=object)
    for i in range(n):
        maps[i] = np.full((3, 4), i, np.uint8) if status[i] == "ok" else np.zeros((0, 0), np.uint8)
        pixels[i] = np.bincount(maps[i].ravel(), minlength=3) if status[i] == "ok" else np.zeros(0, np.int64)
    return {
        "item_id": np.array([f"id{i}" for i in range(n)], dtype=object),
        "uri": np.array([f"/in/sub/{i}.jpg" for i in range(n)], dtype=object),
        "version": np.array(["v"] * n, dtype=object),
        "rel_key": np.array([f"sub/{i}.jpg" for i in range(n)], dtype=object),
        "width": np.array([4] * n, np.int32),
        "height": np.array([3] * n, np.int32),
        "status": np.array(status, dtype=object),
        "error_class": np.array(["" if s == "ok" else "truncated" for s in status], dtype=object),
        "error": np.array(["" if s == "ok" else f"/in/sub/{i}.jpg: cut" for i, s in enumerate(status)], dtype=object),
        "label_map": maps,
        "class_pixels": pixels,
    }


def test_mask_writer_stores_pngs_and_drops_pixels(tmp_path: Path) -> None:
    out = MaskWriter(OutputSpec(uri=str(tmp_path / "out")), task="semantic")(_batch(3, ["ok", "error", "ok"]))
    assert "label_map" not in out
    assert list(out["mask_uri"]) == [str(tmp_path / "out/masks/sub/0.jpg.png"), "", str(tmp_path / "out/masks/sub/2.jpg.png")]
    assert (decode_png_label_map(Path(out["mask_uri"][2]).read_bytes()) == 2).all()
    assert sorted(p.name for p in (tmp_path / "out/masks/sub").iterdir()) == ["0.jpg.png", "2.jpg.png"]


def test_committer_writes_whole_parts_by_row_count(tmp_path: Path) -> None:
    written = MaskWriter(OutputSpec(uri=str(tmp_path / "out")), task="semantic")(_batch(3, ["ok", "error", "ok"]))
    table = rows_to_table(written, CONSTANTS)
    assert table.schema == METADATA_SCHEMA
    assert table.column("error_class").to_pylist() == [None, "truncated", None]
    assert table.column("class_pixels").to_pylist()[2] == [0, 0, 12]
    committer = Committer(OutputSpec(uri=str(tmp_path / "out"), commit_rows=5, commit_seconds=3600), "r1", {"segbatch.task": "semantic"})
    committer.add(table)
    assert not (tmp_path / "out/metadata").exists()  # 3 rows < commit_rows: still pending
    assert not committer.committed_counts  # pending rows are not counted as done
    committer.add(table.slice(0, 2))
    assert [p.rsplit("/", 1)[1] for p in committer.parts] == ["part-r1-00000.parquet"]
    committer.add(table.slice(2, 1))
    committer.flush()
    assert committer.committed_rows == 6 and len(committer.parts) == 2
    assert committer.committed_counts == {"ok": 4, "truncated": 2}
    assert read_rows(str(tmp_path / "out"), {}).num_rows == 6
    errors = pq.read_table(tmp_path / "out/errors").to_pylist()
    assert [e["uri"] for e in errors] == ["/in/sub/1.jpg"] * 2  # the error row was added twice above
    assert pq.read_schema(committer.parts[0]).metadata[b"segbatch.schema_version"] == b"2"
    assert not list((tmp_path / "out").rglob("*.tmp"))
