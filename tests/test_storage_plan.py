"""Listing, manifests, stable item ids and safe output keys (no Ray)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from segbatch.plan import item_id_for, plan_items
from segbatch.spec import InputSpec
from segbatch.storage import UnsafeKeyError, list_objects, safe_relative_key, write_bytes_atomic
from segbatch.spec import IMAGE_EXTENSIONS


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    for name in ["a.jpg", "b.JPEG", "c.Png", "sub/d.tif", "sub/deeper/e.TIFF", "f.webp", "g.bmp", "h.gif"]:
        touch(root / name)
    for name in ["notes.txt", "sub/data.json", "noext", "archive.jpg.zip"]:
        touch(root / name)
    return root


def test_prefix_listing_is_recursive_and_case_insensitive(tree: Path) -> None:
    objects, base = list_objects(str(tree), {}, IMAGE_EXTENSIONS)
    names = sorted(Path(o.uri).relative_to(tree).as_posix() for o in objects)
    assert names == ["a.jpg", "b.JPEG", "c.Png", "f.webp", "g.bmp", "h.gif", "sub/d.tif", "sub/deeper/e.TIFF"]
    assert base == str(tree)
    assert all(o.size == 1 and o.version for o in objects)


def test_glob_listing(tree: Path) -> None:
    objects, base = list_objects(str(tree / "sub" / "**" / "*"), {}, IMAGE_EXTENSIONS)
    assert sorted(Path(o.uri).name for o in objects) == ["d.tif", "e.TIFF"]
    assert base == str(tree / "sub")


@pytest.mark.parametrize("kind", ["txt", "csv", "parquet"])
def test_manifests(tree: Path, kind: str) -> None:
    entries = ["a.jpg", str(tree / "sub" / "d.tif"), "notes.txt"]
    manifest = tree / f"list.{kind}"
    if kind == "txt":
        manifest.write_text("# comment\n" + "\n".join(entries) + "\n\n")
    elif kind == "csv":
        manifest.write_text("uri,label\n" + "\n".join(f"{e},x" for e in entries) + "\n")
    else:
        pq.write_table(pa.table({"uri": entries}), manifest)
    items, listed, skipped = plan_items(InputSpec(uri=str(manifest)))
    assert listed == 2 and skipped == 0
    assert sorted(Path(i.uri).name for i in items) == ["a.jpg", "d.tif"]
    assert {i.rel_key for i in items} == {"a.jpg", "sub/d.tif"} and not any(i.plan_error for i in items)


def test_manifest_without_uri_column_is_a_clear_error(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("path\na.jpg\n")
    with pytest.raises(ValueError, match="expected a 'uri' column"):
        plan_items(InputSpec(uri=str(manifest)))


def test_item_ids_are_stable_and_version_sensitive(tree: Path) -> None:
    first, _, _ = plan_items(InputSpec(uri=str(tree)))
    again, _, _ = plan_items(InputSpec(uri=str(tree)))
    assert [i.item_id for i in first] == [i.item_id for i in again]
    assert len({i.item_id for i in first}) == len(first)
    assert item_id_for("s3://b/k.jpg", "etag1") != item_id_for("s3://b/k.jpg", "etag2")
    touch(tree / "a.jpg", b"changed content")
    changed, _, _ = plan_items(InputSpec(uri=str(tree)))
    diff = {i.uri for i in changed} - {i.uri for i in first if i.item_id in {c.item_id for c in changed}}
    assert diff == {str(tree / "a.jpg")}


def test_done_items_are_skipped(tree: Path) -> None:
    items, listed, _ = plan_items(InputSpec(uri=str(tree)))
    todo, listed2, skipped = plan_items(InputSpec(uri=str(tree)), done={items[0].item_id, items[1].item_id})
    assert listed2 == listed and skipped == 2 and len(todo) == listed - 2


@pytest.mark.parametrize(
    "key",
    [
        "s3://bucket/in/../../etc/passwd.jpg",
        "s3://bucket/in/%2e%2e/x.jpg",
        "s3://bucket/in/%252e%252e/x.jpg",
        "s3://bucket/in/sub/..%2fx.jpg",
        "s3://bucket/in/a\\..\\b.jpg",
        "s3://bucket/in/%2fetc/x.jpg",
        "s3://bucket/in/bad\x00name.jpg",
    ],
)
def test_unsafe_keys_are_refused(key: str) -> None:
    with pytest.raises(UnsafeKeyError):
        safe_relative_key(key, "s3://bucket/in")


def test_safe_keys_mirror_the_input_layout() -> None:
    assert safe_relative_key("s3://bucket/in/a/b.jpg", "s3://bucket/in") == "a/b.jpg"
    assert safe_relative_key("s3://bucket/in//a/./b.jpg", "s3://bucket/in/") == "a/b.jpg"
    assert safe_relative_key("s3://other/x/y.jpg", "s3://bucket/in") == "other/x/y.jpg"
    assert safe_relative_key("/data/in/x.png", "/data/in") == "x.png"


def test_atomic_local_write_leaves_no_temporaries(tmp_path: Path) -> None:
    from fsspec.implementations.local import LocalFileSystem

    fs = LocalFileSystem()
    target = tmp_path / "deep" / "out.bin"
    write_bytes_atomic(fs, str(target), b"one")
    write_bytes_atomic(fs, str(target), b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in target.parent.iterdir()] == ["out.bin"]


# --------------------------------------------------------------------------- the streamed plan


def _manifest(tmp_path: Path, uris: list[str], versions: list[str]) -> Path:
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"uri": uris, "version": versions}), path, row_group_size=3)
    return path


def test_streamed_plan_counts_and_rows_match_across_page_sizes(tmp_path: Path) -> None:
    from segbatch.outputs import Ledger
    from segbatch.plan import PlanCounts, plan_pages

    uris = [f"/data/in/{d}/img-{i}.jpg" for i, d in zip(range(11), "aabbccddeef")]
    versions = ["v1"] * 11
    uris.append(uris[3])  # a duplicate entry: planned once
    versions.append("v1")
    uris.append("/data/in/../../etc/x.jpg")  # an unsafe key: planned, with a plan error
    versions.append("v1")
    manifest = _manifest(tmp_path, uris, versions)
    done = {item_id_for(uris[0], "v1"), item_id_for(uris[5], "v1")}
    earlier = [uris[1], uris[2]]  # committed before in another version: "changed"
    ledger = Ledger.of(done | {item_id_for(u, "v0") for u in earlier}, [uris[0], uris[5], *earlier])
    outcomes = []
    for page_rows in (1, 2, 5, 100):
        counts = PlanCounts()
        tables = list(plan_pages(InputSpec(uri=str(manifest)), ledger, counts, page_rows=page_rows))
        assert all(t.num_rows <= page_rows for t in tables)
        rows = pa.concat_tables(tables).to_pylist()
        outcomes.append(((counts.listed, counts.skipped, counts.new, counts.changed), rows))
    assert all(o == outcomes[0] for o in outcomes)  # the page size changes nothing
    (listed, skipped, new, changed), rows = outcomes[0]
    assert (listed, skipped, new, changed) == (12, 2, 8, 2)
    assert [r["uri"] for r in rows] == [u for u in uris[:11] if u not in (uris[0], uris[5])] + [uris[12]]
    assert rows[0] == {"item_id": item_id_for(uris[1], "v1"), "uri": uris[1], "version": "v1", "size": 0,
                       "rel_key": "a/img-1.jpg", "plan_error": ""}
    assert rows[-1]["rel_key"] == "" and "climbs out of the prefix" in rows[-1]["plan_error"]


def test_common_base_of_a_manifest_is_that_of_all_its_pages(tmp_path: Path) -> None:
    from segbatch.plan import PlanCounts, plan_pages

    uris = ["s3://b/in/x/1.jpg", "s3://b/in/y/2.jpg", "s3://b/in/x/z/3.jpg"]
    manifest = _manifest(tmp_path, uris, ["e"] * 3)
    for page_rows in (1, 3):
        rows = pa.concat_tables(list(plan_pages(InputSpec(uri=str(manifest)), None, PlanCounts(), page_rows))).to_pylist()
        assert [r["rel_key"] for r in rows] == ["x/1.jpg", "y/2.jpg", "x/z/3.jpg"]


def test_written_plan_is_read_back_in_blocks(tmp_path: Path) -> None:
    from segbatch.outputs import Ledger
    from segbatch.plan import PLAN_SCHEMA, read_plan_block, write_plan

    uris = [f"/data/in/img-{i:04d}.jpg" for i in range(2500)]
    manifest = _manifest(tmp_path, uris, ["v"] * 2500)
    out = tmp_path / "out"
    plan = write_plan(InputSpec(uri=str(manifest)), Ledger.empty(), str(out), None, "r1", page_rows=1000)
    assert plan.uri == str(out / "runs" / "r1" / "plan") and plan.part_rows == [1000, 1000, 500]
    assert [Path(p).name for p in plan.parts] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert pq.read_schema(plan.parts[0]) == PLAN_SCHEMA
    blocks = plan.blocks(300)
    assert blocks[:4] == [(plan.parts[0], 0, 300), (plan.parts[0], 300, 600), (plan.parts[0], 600, 900), (plan.parts[0], 900, 1000)]
    read = [r["uri"] for p, a, b in blocks for t in read_plan_block(p, None, a, b) for r in t.to_pylist()]
    assert read == uris  # every row once, in order, across parts and row groups


def test_layered_plan_holds_an_item_while_any_layer_lacks_it(tmp_path: Path) -> None:
    """Planning a several-model job: the bit mask names exactly the layers each item still needs."""
    from segbatch.outputs import LayerLedgers, Ledger
    from segbatch.plan import LAYERED_PLAN_SCHEMA, PlanCounts, plan_pages

    for name in ("a.png", "b.png", "c.png"):
        (tmp_path / name).write_bytes(b"x")
    spec = InputSpec(uri=str(tmp_path))
    ids = {}
    for page in plan_pages(spec):
        ids |= {Path(u).name: i for u, i in zip(page["uri"].to_pylist(), page["item_id"].to_pylist())}
    ledgers = LayerLedgers((Ledger.of([ids["a.png"], ids["b.png"]]), Ledger.of([ids["a.png"], ids["c.png"]])))
    counts = PlanCounts()
    pages = list(plan_pages(spec, ledgers, counts))
    assert all(p.schema == LAYERED_PLAN_SCHEMA for p in pages)
    planned = {Path(u).name: m for p in pages for u, m in zip(p["uri"].to_pylist(), p["layers"].to_pylist())}
    assert planned == {"b.png": 0b10, "c.png": 0b01}  # a.png is done in both layers
    assert (counts.listed, counts.skipped, counts.todo, counts.layer_todo) == (3, 1, 2, [1, 1])
    assert (counts.new, counts.changed, counts.unfinished) == (0, 0, 2)  # this version is in one layer already
