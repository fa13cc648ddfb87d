"""COCO instances JSON (`instances.json`) from committed outputs, written as a stream.

- `images`: in review order; `id` = review rank + 1, `file_name` = the item's `rel_key`, `width`,
  `height`, plus `review_priority` and `segbatch_uri` (extra keys COCO readers ignore);
- `annotations`: `segmentation` as compressed RLE (`{"size": [h, w], "counts": str}`) or, with
  `polygons`, a list of polygons; `bbox` and `area` from the mask (pycocotools `toBbox` / `area`);
  `iscrowd` 0 (with 1, COCOeval ignores every mask; CVAT's own COCO export sets it, cvat#7030);
  `score` (1.0 for semantic masks, which carry none);
- `categories`: the model's classes, ids from 1 (label = id), background left out.

Images go to the final file as they come; annotations to a scratch file that is appended after them,
so memory holds one item at a time. pycocotools' `COCO()` and `loadRes`, and datumaro's
`coco_instances` importer read the file.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from typing import Any

from segbatch.export.dest import Staging
from segbatch.export.geometry import polygons as mask_polygons
from segbatch.export.items import Item, Selection

__all__ = ["FILE_NAME", "write_coco"]

FILE_NAME = "instances.json"


def _segmentation(obj: Any, polygons: bool) -> Any:
    if polygons:
        return [[v for xy in poly for v in xy] for poly in mask_polygons(obj.mask())]
    return {"size": [int(v) for v in obj.rle["size"]], "counts": obj.rle["counts"].decode("ascii")}


def write_coco(items: Iterable[Item], selection: Selection, staging: Staging, *, polygons: bool = False) -> dict[str, Any]:
    """Write `instances.json` from items in review order; returns counts (`images`, `annotations`)."""
    final = staging.path(FILE_NAME)
    anns_path = staging.scratch("coco") + "/annotations.jsonpart"
    images = annotations = 0
    with open(final, "w") as out, open(anns_path, "w") as anns:
        info = {"description": f"segbatch export of {selection.output_uri}", "task": selection.task,
                "min_score": selection.min_score}
        out.write('{"images": [')
        for item in items:
            image_id = item.rank + 1
            entry = {"id": image_id, "file_name": item.rel_key, "width": item.width, "height": item.height,
                     "review_priority": round(item.review_priority, 6), "segbatch_uri": item.uri}
            if images == 0:
                info["model"] = item.model
                info["fingerprint"] = item.fingerprint
            out.write(("," if images else "") + "\n" + json.dumps(entry))
            images += 1
            for obj in item.objects:
                annotations += 1
                ann = {
                    "id": annotations,
                    "image_id": image_id,
                    "category_id": obj.label,
                    "segmentation": _segmentation(obj, polygons),
                    "area": obj.area,
                    "bbox": [float(v) for v in obj.bbox or (0, 0, 0, 0)],
                    "iscrowd": 0,
                    "score": 1.0 if obj.score is None else round(float(obj.score), 6),
                }
                anns.write(("," if annotations > 1 else "") + "\n" + json.dumps(ann))
        out.write('\n], "annotations": [')
        anns.flush()
        with open(anns_path) as src:
            shutil.copyfileobj(src, out, length=1 << 20)
        categories = [{"id": c, "name": selection.class_name(c), "supercategory": ""} for c in selection.labels()]
        out.write('\n], "categories": ' + json.dumps(categories))
        out.write(', "info": ' + json.dumps(info) + ', "licenses": []}\n')
    return {"images": images, "annotations": annotations, "files": [staging.publish(FILE_NAME)]}
