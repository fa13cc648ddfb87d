"""CVAT for images 1.1 (`annotations.xml`) from committed outputs, one file per CVAT task.

CVAT chokes on large annotation uploads (a 100 MB XML gets a 504; a 515 MB one needs 12 GB of server
RAM: cvat#964, cvat#3762), so images are split, in review order, into tasks of at most `task_size`
images. For each task `task-NNNNN`:

- `task-NNNNN/annotations.xml`: `<image id name width height>` per image (`name` = `rel_key`), each
  object a `<mask label source="auto" rle left top width height>` (or `<polygon points>` with
  `polygons`) with the score as an attribute; labels, colours and the `score` attribute in `<meta>`;
- `task-NNNNN.zip`: that XML as CVAT's "Upload annotations" (format "CVAT 1.1") takes it;
- `task-NNNNN/images.txt`: the task's image URIs, one a line, in order: create the CVAT task from
  exactly these images.

Mask RLE: :func:`segbatch.export.geometry.cvat_rle` over the mask's tight box (row-major, starting
with a background run). datumaro's `cvat` importer reads the masks back pixel-exact.
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Iterable
from typing import Any, TextIO
from xml.sax.saxutils import escape, quoteattr

from segbatch.export.dest import Staging
from segbatch.export.geometry import cvat_rle, hex_color, polygons as mask_polygons
from segbatch.export.items import Item, Selection

__all__ = ["TASK_SIZE", "write_cvat"]

#: Images per CVAT task (`--task-size`).
TASK_SIZE = 1000


def _meta(selection: Selection, task_id: int, size: int, name: str) -> str:
    labels = []
    for c in selection.labels():
        score = (
            "<attributes><attribute><name>score</name><mutable>False</mutable><input_type>number</input_type>"
            "<default_value>0</default_value><values>0;1;0.0001</values></attribute></attributes>"
            if selection.task == "instance"
            else "<attributes></attributes>"
        )
        labels.append(
            f"<label><name>{escape(selection.class_name(c))}</name><color>{hex_color(c)}</color>"
            f"<type>any</type>{score}</label>"
        )
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n<annotations>\n<version>1.1</version>\n<meta><task>'
        f"<id>{task_id}</id><name>{escape(name)}</name><size>{size}</size><mode>annotation</mode>"
        f"<overlap>0</overlap><labels>{''.join(labels)}</labels></task></meta>\n"
    )


def _image(out: TextIO, frame: int, item: Item, selection: Selection, polygons: bool) -> int:
    out.write(
        f"<image id=\"{frame}\" name={quoteattr(item.rel_key)} width=\"{item.width}\" height=\"{item.height}\">\n"
    )
    shapes = 0
    for obj in sorted(item.objects, key=lambda o: -o.area):  # largest first: smaller ones stay on top
        label = quoteattr(selection.class_name(obj.label))
        attr = "" if obj.score is None else f'<attribute name="score">{obj.score:.4f}</attribute>'
        mask = obj.mask()
        if polygons:
            for poly in mask_polygons(mask):
                points = ";".join(f"{x:.2f},{y:.2f}" for x, y in poly)
                out.write(f'<polygon label={label} source="auto" occluded="0" z_order="{shapes}" points="{points}">'
                          f"{attr}</polygon>\n")
                shapes += 1
            continue
        x, y, w, h = (int(v) for v in obj.bbox or (0, 0, 0, 0))
        rle = ", ".join(str(v) for v in cvat_rle(mask, (x, y, w, h)))
        out.write(
            f'<mask label={label} source="auto" occluded="0" z_order="{shapes}" rle="{rle}" '
            f'left="{x}" top="{y}" width="{w}" height="{h}">{attr}</mask>\n'
        )
        shapes += 1
    out.write("</image>\n")
    return shapes


def write_cvat(
    items: Iterable[Item], selection: Selection, staging: Staging, *, polygons: bool = False, task_size: int = TASK_SIZE
) -> dict[str, Any]:
    """Write one CVAT task's files per `task_size` images, from items in review order."""
    if task_size < 1:
        raise ValueError(f"--task-size expected a positive number, but got {task_size}")
    tasks = max(1, math.ceil(selection.images / task_size))
    files: list[str] = []
    images = shapes = 0
    out: TextIO | None = None
    uris: TextIO | None = None
    name = ""

    def close() -> None:
        nonlocal out, uris
        if out is None or uris is None:
            return
        out.write("</annotations>\n")
        out.close()
        uris.close()
        with zipfile.ZipFile(staging.path(f"{name}.zip"), "w", zipfile.ZIP_DEFLATED) as z:
            z.write(staging.path(f"{name}/annotations.xml"), "annotations.xml")
        files.extend(staging.publish(f) for f in (f"{name}/annotations.xml", f"{name}/images.txt", f"{name}.zip"))
        out = uris = None

    for item in items:
        frame = images % task_size
        if frame == 0:
            close()
            task = images // task_size + 1
            name = f"task-{task:05d}"
            size = min(task_size, selection.images - images)
            out = open(staging.path(f"{name}/annotations.xml"), "w", encoding="utf-8")  # noqa: SIM115
            uris = open(staging.path(f"{name}/images.txt"), "w", encoding="utf-8")  # noqa: SIM115
            out.write(_meta(selection, task, size, f"segbatch {name} of {tasks}"))
        if out is None or uris is None:  # pragma: no cover - opened above at frame 0
            raise RuntimeError("CVAT task file not open")
        shapes += _image(out, frame, item, selection, polygons)
        uris.write(item.uri + "\n")
        images += 1
    close()
    return {"images": images, "annotations": shapes, "tasks": math.ceil(images / task_size), "files": files}
