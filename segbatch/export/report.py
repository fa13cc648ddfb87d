"""`segbatch report OUTPUT`: a static HTML page to look at a job's results, worst first.

Writes `OUTPUT/report/index.html` and `OUTPUT/report/overlays/*.png` (and `summary.json`): no server,
no script, no CDN, CSS inline, images by relative links, so the folder opens from a bucket or a laptop
offline. The page holds:

- the output, model, fingerprint and counts (images, objects, error rows, older commits left out);
- a legend of the fixed class colours (:data:`segbatch.export.geometry.CLASS_COLORS`);
- per-class counts (objects, images, mean score) and a score histogram (instance outputs);
- a gallery of overlays in review order (:mod:`segbatch.export.priority`, worst first), `gallery`
  images at most: each mask filled in its class colour at alpha 0.5 with a 2 px contour, largest
  objects drawn first (small ones stay visible on top), a "label score" tag per object;
- the error rows (counts by class and the first examples), which are left out of everything else.

It reads what exports read (:mod:`segbatch.export.items`: two passes, flat memory) plus the source
images of the gallery, scaled to at most :data:`MAX_SIDE` pixels.
"""

from __future__ import annotations

import html
import io
import json
import logging
import re
import tempfile
from collections import Counter
from datetime import datetime, timezone
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from segbatch.export.dest import Staging
from segbatch.export.geometry import class_color, hex_color
from segbatch.export.items import ErrorTally, Item, Selection, iter_items, select
from segbatch.outputs import layer_output
from segbatch.storage import filesystem, join_uri

__all__ = ["ALPHA", "MAX_SIDE", "REPORT", "draw_overlay", "write_report_html"]

logger = logging.getLogger(__name__)

#: The report's folder under the output.
REPORT = "report"
#: Fill opacity of masks in overlays.
ALPHA = 0.5
#: Contour width in overlay pixels.
CONTOUR = 2
#: Overlays are scaled so that their longer side is at most this.
MAX_SIDE = 640
_BINS = 20


def _erode(mask: np.ndarray) -> np.ndarray:
    """4-neighbour erosion of a bool mask (pixels outside the image count as unset)."""
    p = np.pad(mask, 1, constant_values=False)
    return p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]


def draw_overlay(image: np.ndarray, objects: list[tuple[np.ndarray, int, str]]) -> Image.Image:
    """An RGB overlay: each (mask, label, tag) filled at :data:`ALPHA` in its class colour with a
    :data:`CONTOUR`-px contour, in the order given (pass the largest first), then the tags."""
    out = image.astype(np.float32).copy()
    boxes = []
    for mask, label, tag in objects:
        if not mask.any():
            continue
        color = np.asarray(class_color(label), dtype=np.float32)
        out[mask] = (1 - ALPHA) * out[mask] + ALPHA * color
        inner = mask
        for _ in range(CONTOUR):
            inner = _erode(inner)
        out[mask & ~inner] = color
        ys, xs = np.nonzero(mask)
        boxes.append((int(xs.min()), int(ys.min()), label, tag))
    im = Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    font = ImageFont.load_default()
    for x, y, label, tag in boxes:
        left, top, right, bottom = draw.textbbox((0, 0), tag, font=font)
        w, h = right - left + 4, bottom - top + 4
        ty = y - h if y - h >= 0 else y
        draw.rectangle((x, ty, x + w, ty + h), fill=class_color(label))
        draw.text((x + 2 - left, ty + 2 - top), tag, fill=(255, 255, 255), font=font)
    return im


def _read_image(uri: str, width: int, height: int) -> tuple[np.ndarray, bool]:
    """The image as RGB (EXIF-oriented, as the job saw it), or a grey canvas when it cannot be read."""
    from PIL import ImageOps

    try:
        fs, path = filesystem(uri)
        with Image.open(io.BytesIO(bytes(fs.cat_file(path)))) as im:
            arr = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
        if arr.shape[:2] == (height, width):
            return arr, True
    except Exception as e:  # noqa: BLE001 - the overlay still shows the masks
        logger.warning("report: cannot read %s (%s: %s); drawing on grey", uri, type(e).__name__, e)
    return np.full((height, width, 3), 128, np.uint8), False


def _overlay(item: Item, selection: Selection) -> Image.Image:
    image, _ = _read_image(item.uri, item.width, item.height)
    scale = min(1.0, MAX_SIDE / max(item.width, item.height, 1))
    size = (max(1, round(item.width * scale)), max(1, round(item.height * scale)))
    if scale < 1.0:
        image = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
    objects = []
    for obj in sorted(item.objects, key=lambda o: -o.area):  # largest first
        mask = obj.mask()
        if scale < 1.0:
            mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 127
        tag = selection.class_name(obj.label) + ("" if obj.score is None else f" {obj.score:.2f}")
        objects.append((mask, obj.label, tag))
    return draw_overlay(image, objects)


def _overlay_name(item: Item) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", item.rel_key)[-80:]
    return f"overlays/{item.rank + 1:06d}-{safe}.png"


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:16px;color:#222;background:#fafafa}
h1{font-size:20px;margin:0 0 4px} h2{font-size:16px;margin:16px 0 6px}
.meta{color:#555;margin-bottom:8px} .row{display:flex;gap:24px;flex-wrap:wrap;align-items:flex-start}
table{border-collapse:collapse;background:#fff} td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
td.n{text-align:right} .legend span{display:inline-block;margin-right:14px}
.sw{display:inline-block;width:14px;height:14px;vertical-align:-2px;margin-right:4px;border:1px solid #0003}
.gallery{display:flex;flex-wrap:wrap;gap:12px} figure{margin:0;background:#fff;border:1px solid #ddd;padding:6px}
figure img{display:block;max-width:100%;height:auto} figcaption{font-size:12px;color:#444;word-break:break-all}
.err td{font-size:12px} svg text{font-size:10px;fill:#444}
"""


def _histogram_svg(counts: np.ndarray) -> str:
    w, h, pad = 320, 120, 18
    top = max(int(counts.max()), 1)
    bw = (w - 2 * pad) / len(counts)
    bars = []
    for i, c in enumerate(counts):
        bh = (h - 2 * pad) * int(c) / top
        bars.append(
            f'<rect x="{pad + i * bw:.1f}" y="{h - pad - bh:.1f}" width="{bw - 1:.1f}" height="{bh:.1f}" fill="#4363d8">'
            f"<title>{i / len(counts):.2f}-{(i + 1) / len(counts):.2f}: {int(c)}</title></rect>"
        )
    axis = (
        f'<text x="{pad}" y="{h - 4}">0</text><text x="{w / 2 - 4:.0f}" y="{h - 4}">0.5</text>'
        f'<text x="{w - pad - 6}" y="{h - 4}">1</text><text x="2" y="12">{top}</text>'
    )
    return f'<svg width="{w}" height="{h}" role="img" aria-label="score histogram">{"".join(bars)}{axis}</svg>'


def write_report_html(
    output_uri: str,
    *,
    dest: str | None = None,
    min_score: float = 0.0,
    gallery: int = 200,
    storage_options: dict[str, Any] | None = None,
    dest_storage_options: dict[str, Any] | None = None,
    layer: str | None = None,
) -> dict[str, Any]:
    """Write the report (see the module docstring); returns `index` (its URI) and counts. Of a several-model
    job's output, a layer's (`layer`, as `segbatch export --layer`), under `OUTPUT/<layer>/report/`.

    Raises:
        JobError: nothing committed under `output_uri`, or no such layer.
    """
    output_uri = layer_output(output_uri, storage_options, layer)
    dest = dest or join_uri(output_uri, REPORT)
    errors = ErrorTally()
    objects: Counter[int] = Counter()
    images_with: Counter[int] = Counter()
    score_sum: Counter[int] = Counter()
    hist = np.zeros(_BINS, np.int64)
    shown: list[Item] = []
    model = fingerprint = ""
    with tempfile.TemporaryDirectory(prefix="segbatch-report-") as work:
        selection = select(output_uri, storage_options, min_score=min_score, workdir=work)
        for item in iter_items(selection, masks=lambda r: r < gallery, errors=errors):
            model, fingerprint = item.model, item.fingerprint
            for label in {o.label for o in item.objects}:
                images_with[label] += 1
            for o in item.objects:
                objects[o.label] += 1
                if o.score is not None:
                    score_sum[o.label] += o.score  # type: ignore[assignment]
                    hist[min(int(o.score * _BINS), _BINS - 1)] += 1
            if item.rank < gallery:
                shown.append(item)
    shown.sort(key=lambda it: it.rank)
    with Staging(dest, dest_storage_options) as staging:
        cards = []
        for item in shown:
            name = _overlay_name(item)
            _overlay(item, selection).save(staging.path(name), format="PNG", optimize=False, compress_level=6)
            staging.publish(name)
            top = item.top_score
            caption = (
                f"#{item.rank + 1} · {html.escape(item.rel_key)} · priority {item.review_priority:.3f} · "
                f"{len(item.objects)} objects" + ("" if top is None else f" · top score {top:.2f}")
            )
            w = min(item.width, round(item.width * min(1.0, MAX_SIDE / max(item.width, item.height, 1))))
            lazy = ' loading="lazy"' if len(cards) >= 24 else ""
            cards.append(
                f'<figure style="width:{w}px"><img src="{html.escape(name)}" width="{w}" alt="{html.escape(item.rel_key)}"{lazy}>'
                f"<figcaption>{caption}</figcaption></figure>"
            )
        labels = selection.labels()
        legend = "".join(
            f'<span><i class="sw" style="background:{hex_color(c)}"></i>{html.escape(selection.class_name(c))}</span>'
            for c in labels
        )
        rows = "".join(
            f"<tr><td><i class=\"sw\" style=\"background:{hex_color(c)}\"></i>{html.escape(selection.class_name(c))}</td>"
            f'<td class="n">{objects[c]}</td><td class="n">{images_with[c]}</td>'
            + (f'<td class="n">{score_sum[c] / objects[c]:.3f}</td>' if selection.task == "instance" and objects[c] else
               ("<td>-</td>" if selection.task == "instance" else ""))
            + "</tr>"
            for c in labels
        )
        score_head = "<th>mean score</th>" if selection.task == "instance" else ""
        what = "objects" if selection.task == "instance" else "class regions"
        counts_table = f"<table><tr><th>class</th><th>{what}</th><th>images</th>{score_head}</tr>{rows}</table>"
        histogram = (
            f"<div><h2>Scores</h2>{_histogram_svg(hist)}</div>"
            if selection.task == "instance"
            else "<div><h2>Scores</h2><p>Semantic masks carry no score.</p></div>"
        )
        err_counts = "".join(f'<tr><td>{html.escape(k)}</td><td class="n">{v}</td></tr>' for k, v in sorted(errors.counts.items()))
        err_rows = "".join(
            f"<tr><td>{html.escape(e['rel_key'] or e['uri'])}</td><td>{html.escape(e['error_class'])}</td>"
            f"<td>{html.escape(e['error'])}</td></tr>"
            for e in errors.examples
        )
        error_html = (
            f'<table class="err"><tr><th>error class</th><th>rows</th></tr>{err_counts}</table><br>'
            f'<table class="err"><tr><th>image</th><th>class</th><th>error</th></tr>{err_rows}</table>'
            if errors.total
            else "<p>No error rows.</p>"
        )
        generated = datetime.now(timezone.utc).isoformat(timespec="seconds")
        page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>segbatch report: {html.escape(output_uri)}</title>
<style>{_CSS}</style></head><body>
<h1>segbatch report</h1>
<div class="meta">{html.escape(output_uri)} · {selection.task} · model {html.escape(model)} · fingerprint
{html.escape(fingerprint)} · {selection.images} images · {sum(objects.values())} {what} ·
{errors.total} error rows · {selection.superseded} older commits left out · min score {min_score:g} · {generated}</div>
<div class="legend">{legend}</div>
<div class="row"><div><h2>Per class</h2>{counts_table}</div>{histogram}</div>
<h2>Gallery: {len(shown)} of {selection.images} images, worst first (review_priority)</h2>
<div class="gallery" id="gallery">{"".join(cards)}</div>
<h2>Errors ({errors.total} rows, left out above)</h2>{error_html}
</body></html>
"""
        with open(staging.path("index.html"), "w", encoding="utf-8") as f:
            f.write(page)
        summary = {
            "output": output_uri,
            "task": selection.task,
            "images": selection.images,
            "overlays": len(shown),
            "objects": {selection.class_name(c): objects[c] for c in labels},
            "score_histogram": hist.tolist(),
            "errors": dict(errors.counts),
            "error_rows": errors.total,
            "superseded": selection.superseded,
        }
        with open(staging.path("summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        staging.publish("summary.json")
        summary["index"] = staging.publish("index.html")
    return summary
