"""The one reader of an output folder: rows, the latest row per item, file metadata, the ledger, --force."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from segbatch.errors import JobError
from segbatch.outputs import (
    METADATA_SCHEMA,
    Ledger,
    file_metadata,
    hash64,
    iter_parts,
    latest_rows,
    metadata_parts,
    output_classes,
    output_task,
    read_ledger,
    read_rows,
)
from segbatch.sinks import Committer
from segbatch.spec import OutputSpec


def _rows(uris: list[str], version: str, fingerprint: str = "f1", status: str = "ok") -> pa.Table:
    n = len(uris)
    now = pa.scalar(int(time.time() * 1000), pa.timestamp("ms", tz="UTC"))
    columns = {f.name: pa.nulls(n, f.type) for f in METADATA_SCHEMA}
    columns.update(
        item_id=pa.array([f"{u}@{version}" for u in uris]),
        uri=pa.array(uris),
        version=pa.array([version] * n),
        rel_key=pa.array([u.rsplit("/", 1)[1] for u in uris]),
        status=pa.array([status] * n),
        task=pa.array(["semantic"] * n),
        fingerprint=pa.array([fingerprint] * n),
        committed_at=pa.array([now.value] * n, pa.timestamp("ms", tz="UTC")),
    )
    return pa.table(columns, schema=METADATA_SCHEMA)


def _commit(out: Path, run_id: str, table: pa.Table) -> None:
    committer = Committer(OutputSpec(uri=str(out)), run_id, {"segbatch.task": "semantic", "segbatch.classes": json.dumps(["bg", "a"])})
    committer.add(table)
    committer.flush()


def test_an_empty_output_holds_nothing(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    assert read_rows(out, None).num_rows == 0 and read_rows(out, None).schema == METADATA_SCHEMA
    assert metadata_parts(out, None) == [] and file_metadata(out, None) == {}
    assert len(read_ledger(out, None, "f1")) == 0


def test_rows_parts_and_file_metadata(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _commit(out, "r1", _rows(["/in/a.png", "/in/b.png"], "v1"))
    time.sleep(0.01)
    _commit(out, "r2", _rows(["/in/a.png"], "v2"))
    assert [Path(p).name for p in metadata_parts(str(out), None)] == ["part-r1-00000.parquet", "part-r2-00000.parquet"]
    assert [t.num_rows for t in iter_parts(str(out), None, ["uri"])] == [2, 1]
    assert read_rows(str(out), None, ["uri", "version"]).column_names == ["uri", "version"]
    meta = file_metadata(str(out), None)
    assert output_task(meta) == "semantic" and output_classes(meta) == ["bg", "a"]
    assert meta["segbatch.schema_version"] == "2"


def test_latest_row_per_uri_is_the_last_committed() -> None:
    first = _rows(["/in/a.png", "/in/b.png"], "v1")
    later = _rows(["/in/a.png"], "v2").set_column(
        METADATA_SCHEMA.get_field_index("committed_at"), "committed_at",
        pa.array([first["committed_at"][0].value + 1000], pa.timestamp("ms", tz="UTC")),
    )
    latest = latest_rows(pa.concat_tables([later, first]))  # read order does not matter, commit time does
    assert sorted(zip(latest["uri"].to_pylist(), latest["version"].to_pylist())) == [("/in/a.png", "v2"), ("/in/b.png", "v1")]
    same_time = pa.concat_tables([first.slice(0, 1), first.slice(0, 1).set_column(2, "version", pa.array(["later"]))])
    assert latest_rows(same_time)["version"].to_pylist() == ["later"]  # a tie goes to the row read later


def test_ledger_holds_hashes_of_committed_ids_and_uris(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _commit(out, "r1", _rows(["/in/a.png", "/in/b.png"], "v1"))
    ledger = read_ledger(str(out), None, "f1")
    assert ledger.done.dtype == np.uint64 and len(ledger) == 2
    ids = hash64(["/in/a.png@v1", "/in/a.png@v2", "/in/c.png@v1"])
    assert ledger.has_items(ids).tolist() == [True, False, False]
    assert ledger.had_uris(hash64(["/in/a.png", "/in/c.png"])).tolist() == [True, False]
    assert (hash64(["x", "y"]) == hash64(pa.array(["x", "y"]))).all()  # stable, whatever holds the strings
    assert Ledger.of(["/in/a.png@v1"]).has_items(ids).tolist() == [True, False, False]


def test_ledger_refuses_other_fingerprints_and_force_moves_parts_aside(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _commit(out, "r1", _rows(["/in/a.png"], "v1", fingerprint="other"))
    with pytest.raises(JobError, match="fingerprint other, this job's is f1.*--force"):
        read_ledger(str(out), None, "f1")
    assert len(read_ledger(str(out), None, "f1", force=True, run_id="r9")) == 0
    assert read_rows(str(out), None).num_rows == 0
    assert [p.name for p in (out / "superseded" / "r9" / "metadata").iterdir()] == ["part-r1-00000.parquet"]
