"""Sources → work items with stable ids, minus the items already committed.

A work item is one image. Its `item_id` is derived from the source URI and the object's version
(etag, or size+mtime), so the same object always gets the same id: resume and incremental runs are
a set difference, and a changed object is new work.
"""

from __future__ import annotations

import csv
import hashlib
import io
import posixpath
from dataclasses import dataclass
from typing import Any

import pyarrow.parquet as pq

from segbatch.spec import InputSpec
from segbatch.storage import ListedObject, filesystem, list_objects, protocol_of, read_bytes, unstrip

__all__ = ["WorkItem", "item_id_for", "plan_items", "read_manifest"]

_MANIFEST_SUFFIXES = (".txt", ".csv", ".parquet")


@dataclass(slots=True, frozen=True)
class WorkItem:
    """One image to segment. `base` is the prefix its output key is made relative to."""

    item_id: str
    uri: str
    base: str
    size: int
    version: str


def item_id_for(uri: str, version: str) -> str:
    """Stable id: sha256 of the URI and its version, 20 hex digits (80 bits: no collisions in practice)."""
    return hashlib.sha256(f"{uri}\n{version}".encode()).hexdigest()[:20]


def _is_manifest(uri: str) -> bool:
    return uri.lower().endswith(_MANIFEST_SUFFIXES) and not any(ch in uri for ch in "*?[")


def read_manifest(uri: str, storage_options: dict[str, Any] | None) -> list[ListedObject]:
    """Read a .txt / .csv / .parquet manifest of image URIs.

    Relative entries are resolved against the manifest's folder. Optional `size` and `version`
    (or `etag`) columns are used as the object's version; without them the URI alone identifies it.
    """
    fs, path = filesystem(uri, storage_options)
    raw = read_bytes(uri, storage_options)
    lower = uri.lower()
    rows: list[dict[str, Any]]
    if lower.endswith(".txt"):
        rows = [{"uri": line.strip()} for line in raw.decode("utf-8").splitlines()]
        rows = [r for r in rows if r["uri"] and not r["uri"].startswith("#")]
    elif lower.endswith(".csv"):
        rows = list(csv.DictReader(io.StringIO(raw.decode("utf-8"))))
    else:
        rows = pq.read_table(io.BytesIO(raw)).to_pylist()
    if rows and "uri" not in rows[0]:
        raise ValueError(f"manifest '{uri}' expected a 'uri' column, but got columns {sorted(rows[0])}")
    folder = unstrip(fs, posixpath.dirname(path))
    out = []
    for r in rows:
        entry = str(r["uri"]).strip()
        if "://" not in entry and not entry.startswith("/"):
            entry = folder.rstrip("/") + "/" + entry
        version = str(r.get("version") or r.get("etag") or r.get("size") or "")
        out.append(ListedObject(uri=entry, size=int(r.get("size") or 0), version=version))
    return out


def plan_items(spec: InputSpec, done: set[str] | frozenset[str] = frozenset()) -> tuple[list[WorkItem], int, int]:
    """List the input and turn it into work items, leaving out those in `done`.

    Returns:
        (items to process, number listed, number skipped as already done).
    """
    if _is_manifest(spec.uri):
        objects = read_manifest(spec.uri, spec.storage_options)
        objects = [o for o in objects if posixpath.basename(o.uri).rpartition(".")[2].lower() in spec.extensions]
        base = _common_base([o.uri for o in objects])
    else:
        objects, base = list_objects(spec.uri, spec.storage_options, spec.extensions)
    items = []
    seen: set[str] = set()
    for o in objects:
        iid = item_id_for(o.uri, o.version)
        if iid in seen:
            continue
        seen.add(iid)
        items.append(WorkItem(item_id=iid, uri=o.uri, base=base, size=o.size, version=o.version))
    todo = [it for it in items if it.item_id not in done]
    return todo, len(items), len(items) - len(todo)


def _common_base(uris: list[str]) -> str:
    """The deepest folder shared by all URIs (same scheme), so manifest outputs mirror their layout."""
    if not uris:
        return ""
    schemes = {protocol_of(u) for u in uris}
    if len(schemes) > 1:
        return ""
    dirs = [posixpath.dirname(u.split("://", 1)[-1]) for u in uris]
    common = posixpath.commonpath(dirs) if all(d.startswith("/") for d in dirs) or not any(d.startswith("/") for d in dirs) else ""
    scheme = schemes.pop()
    return common if scheme == "file" else f"{scheme}://{common}"
