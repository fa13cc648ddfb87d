"""Label Studio tasks with predictions, and the labeling config that fits them.

Files:

- `labeling_config.xml`: `<Image name="image" value="$image">` and `<BrushLabels name="label">`
  (`<PolygonLabels>` with `polygons`), one `<Label>` per class in its fixed colour. Paste it into the
  project's Labeling Interface (Code).
- `tasks.json`, or `tasks-NNNNN.json` when one file would break Label Studio's import limits (one
  import: at most 250,000 tasks and 200 MB; Label Studio advises about 100,000 tasks a project):
  files hold at most :data:`MAX_TASKS` tasks and :data:`MAX_BYTES` bytes each. The chunks are JSON
  lists, not JSONL: JSON is the task format Label Studio's import documents for files and POSTs.

Each task: `data.image` is the image's URI when it is in a bucket (`s3://`, `gs://`, `azure-blob://`:
served through a connected source storage) or a `/data/local-files/?d=<path>` URL for local files
(`<path>` relative to `local_files_root`, Label Studio's `LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT`);
`data` also carries `rel_key`, `review_priority` and `review_rank`, which the Data Manager can sort
by. One prediction per task: `model_version` = the output's fingerprint, `score` = the top score, and
one result per object: `brushlabels` in Label Studio's brush RLE of the full image (0/255 values;
:mod:`segbatch.export.brush`, byte for byte what `label_studio_sdk.converter.brush.mask2rle` gives, 7-15×
faster) or `polygonlabels` in percent of the image's width and height.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote
from xml.sax.saxutils import quoteattr


from segbatch.export.brush import encode_brush
from segbatch.export.dest import Staging
from segbatch.export.geometry import hex_color, polygons as mask_polygons
from segbatch.export.items import Item, Selection
from segbatch.storage import protocol_of

__all__ = ["CONFIG_NAME", "MAX_BYTES", "MAX_TASKS", "image_url", "labeling_config", "write_labelstudio"]

CONFIG_NAME = "labeling_config.xml"
#: Per tasks file: below Label Studio's 250k tasks and 200 MB per import, with room to spare.
MAX_TASKS = 100_000
MAX_BYTES = 150 * 1024 * 1024
FROM_NAME, TO_NAME = "label", "image"


def labeling_config(selection: Selection, *, polygons: bool = False) -> str:
    """The labeling config XML for the exported classes."""
    tag = "PolygonLabels" if polygons else "BrushLabels"
    labels = "\n".join(
        f"    <Label value={quoteattr(selection.class_name(c))} background=\"{hex_color(c)}\"/>" for c in selection.labels()
    )
    return (
        "<View>\n"
        f'  <Image name="{TO_NAME}" value="$image" zoom="true"/>\n'
        f'  <{tag} name="{FROM_NAME}" toName="{TO_NAME}">\n{labels}\n  </{tag}>\n'
        "</View>\n"
    )


def image_url(uri: str, local_files_root: str = "/") -> str:
    """`data.image` for an image URI: bucket URIs as they are; local paths as a local-files URL.

    Example:
        >>> image_url("/data/imgs/a b.jpg", "/data")
        '/data/local-files/?d=imgs/a%20b.jpg'
        >>> image_url("s3://bucket/a.jpg")
        's3://bucket/a.jpg'
    """
    if protocol_of(uri) != "file":
        return uri
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(local_files_root))
    if rel.startswith(".."):
        raise ValueError(f"expected images under --local-files-root '{local_files_root}', but got '{path}'")
    return "/data/local-files/?d=" + quote(rel.replace(os.sep, "/"))


def _results(item: Item, selection: Selection, polygons: bool) -> list[dict[str, Any]]:
    out = []
    for k, obj in enumerate(sorted(item.objects, key=lambda o: -o.area)):
        name = selection.class_name(obj.label)
        base: dict[str, Any] = {"from_name": FROM_NAME, "to_name": TO_NAME, "original_width": item.width,
                                "original_height": item.height, "image_rotation": 0}
        if obj.score is not None:
            base["score"] = round(float(obj.score), 6)
        mask = obj.mask()
        if polygons:
            for j, poly in enumerate(mask_polygons(mask)):
                points = [[100.0 * x / item.width, 100.0 * y / item.height] for x, y in poly]
                out.append({"id": f"r{item.rank}-{k}-{j}", **base, "type": "polygonlabels",
                            "value": {"points": points, "closed": True, "polygonlabels": [name]}})
        else:
            rle = encode_brush(mask)  # bool: written as 0/255
            out.append({"id": f"r{item.rank}-{k}", **base, "type": "brushlabels",
                        "value": {"format": "rle", "rle": rle, "brushlabels": [name]}})
    return out


def task_of(item: Item, selection: Selection, *, polygons: bool = False, local_files_root: str = "/") -> dict[str, Any]:
    """One Label Studio task (data + one prediction) for an item."""
    top = item.top_score
    prediction: dict[str, Any] = {"model_version": item.fingerprint,
                                  "result": _results(item, selection, polygons)}
    if top is not None:
        prediction["score"] = round(float(top), 6)
    return {
        "data": {"image": image_url(item.uri, local_files_root), "rel_key": item.rel_key,
                 "review_priority": round(item.review_priority, 6), "review_rank": item.rank},
        "predictions": [prediction],
    }


def write_labelstudio(
    items: Iterable[Item],
    selection: Selection,
    staging: Staging,
    *,
    polygons: bool = False,
    local_files_root: str = "/",
    max_tasks: int = MAX_TASKS,
    max_bytes: int = MAX_BYTES,
) -> dict[str, Any]:
    """Write the labeling config and the tasks files from items in review order."""
    with open(staging.path(CONFIG_NAME), "w") as f:
        f.write(labeling_config(selection, polygons=polygons))
    files = [staging.publish(CONFIG_NAME)]
    chunks: list[str] = []
    out = None
    in_chunk = size = 0
    images = results = 0

    def close() -> None:
        nonlocal out
        if out is not None:
            out.write("\n]\n")
            out.close()
            out = None

    for item in items:
        line = json.dumps(task_of(item, selection, polygons=polygons, local_files_root=local_files_root))
        data = len(line.encode()) + 2
        if out is None or in_chunk >= max_tasks or size + data + 3 > max_bytes:
            close()
            chunks.append(f"tasks-{len(chunks) + 1:05d}.json")
            out = open(staging.path(chunks[-1]), "w")  # noqa: SIM115 - closed by close()
            out.write("[")
            in_chunk, size = 0, 1
        out.write(("," if in_chunk else "") + "\n" + line)
        in_chunk += 1
        size += data
        images += 1
        results += len(item.objects)
    close()
    if not chunks:
        chunks = ["tasks-00001.json"]
        with open(staging.path(chunks[0]), "w") as f:
            f.write("[]\n")
    if len(chunks) == 1:
        os.replace(staging.path(chunks[0]), staging.path("tasks.json"))
        chunks = ["tasks.json"]
    files += [staging.publish(c) for c in chunks]
    return {"images": images, "annotations": results, "task_files": len(chunks), "files": files}
