"""Exports at scale: `segbatch export` of a synthetic committed instance output of N rows (time, peak RSS).

No model runs: the output is written straight in the real schema (`outputs.METADATA_SCHEMA`, with the file
metadata a job writes), `--part-rows` rows a part. Each ok row is a 256×256 image with 1-5 instances whose
masks (COCO RLE) are drawn from a pool of 256 generated shapes; 1% of rows are errors, and 0.5% of the
images are committed a second time in a later part (the export must take the later row).

Prints one JSON line per format (`pass1`: pass 1 alone, `segbatch.export.items.select`):
  format, rows, images, annotations, seconds, images_per_s   the export, in a fresh process
  cpu_seconds, images_per_cpu_s                               its CPU time (steadier than seconds on a shared machine)
  peak_rss_mb, baseline_rss_mb, peak_above_baseline_mb        that process's peak RSS, and after imports
  dest_mb                                                     size of what it wrote

Compare N and 10×N: flat memory means peak_above_baseline_mb does not grow with N.

Usage: python benchmarks/export_scale.py --rows 100000 [--formats coco cvat labelstudio pass1] [--workdir /tmp/segbatch-export-scale]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

SIZE = 256
CLASSES = ["background", "circle", "rectangle", "triangle"]


def _pool(count: int = 256) -> list[tuple[int, str, int]]:
    """(label, RLE counts, area) of `count` generated shape masks on a SIZE×SIZE image."""
    import numpy as np
    from pycocotools import mask as mask_util

    from segbatch.synth import circle, rectangle, shape_mask, triangle

    rng = np.random.default_rng(0)
    out = []
    for i in range(count):
        cx, cy = (float(v) for v in rng.uniform(40, SIZE - 40, 2))
        s = float(rng.uniform(6, 60))
        label = 1 + i % 3
        shape = (
            circle(cx, cy, s / 2)
            if label == 1
            else rectangle(cx, cy, s, s / 2, float(rng.uniform(0, 3.14)))
            if label == 2
            else triangle((cx - s / 2, cy + s / 2), (cx + s / 2, cy + s / 2), (cx, cy - s / 2))
        )
        mask = shape_mask(shape, SIZE, SIZE)
        rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
        out.append((label, rle["counts"].decode("ascii"), int(mask_util.area(rle))))
    return out


def generate(work: Path, rows: int, part_rows: int) -> Path:
    """A committed instance output of `rows` rows under `work/n<rows>/out` (made once, then reused)."""
    from datetime import datetime, timedelta, timezone

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from segbatch.outputs import METADATA_SCHEMA, SCHEMA_VERSION

    out = work / f"n{rows}" / "out"
    stamp = out.parent / ".made"
    if stamp.exists() and stamp.read_text().strip() == str(part_rows):
        return out
    shutil.rmtree(out, ignore_errors=True)
    (out / "metadata").mkdir(parents=True)
    pool = _pool()
    rng = np.random.default_rng(1)
    meta = {b"segbatch.task": b"instance", b"segbatch.classes": json.dumps(CLASSES).encode(),
            b"segbatch.schema_version": SCHEMA_VERSION.encode()}
    schema = METADATA_SCHEMA.with_metadata(meta)
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    redo = max(1, rows // 200)  # images committed again, at the end

    def part(seq: int, idx: range | list[int], when: datetime) -> None:
        n = len(idx)
        errors = rng.random(n) < 0.01
        instances, num = [], []
        for k in range(n):
            if errors[k]:
                instances.append(None)
                num.append(None)
                continue
            picks = rng.integers(0, len(pool), int(rng.integers(1, 6)))
            inst = [{"label": pool[p][0], "score": float(rng.uniform(0.05, 1.0)), "bbox": [0.0, 0.0, 1.0, 1.0],
                     "area": pool[p][2], "rle": pool[p][1]} for p in picks]
            instances.append(inst)
            num.append(len(inst))
        uris = [f"s3://bench-bucket/images/{i // 1000:05d}/img-{i:08d}.jpg" for i in idx]
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
                "error": ["bench: unreadable" if e else None for e in errors],
                "mask_uri": [None] * n,
                "task": ["instance"] * n,
                "model": ["bench"] * n,
                "weights_sha256": ["0" * 64] * n,
                "fingerprint": ["bench0fingerprnt"] * n,
                "run_id": [f"run{seq}"] * n,
                "class_pixels": [None] * n,
                "num_instances": num,
                "instances": instances,
                "committed_at": [when] * n,
            },
            schema=schema,
        )
        pq.write_table(table, out / "metadata" / f"part-bench-{seq:06d}.parquet", compression="zstd")

    seq = 0
    for first in range(0, rows - redo, part_rows):
        part(seq, range(first, min(first + part_rows, rows - redo)), start + timedelta(seconds=seq))
        seq += 1
    again = sorted(int(i) for i in rng.choice(rows - redo, size=redo, replace=False))
    part(seq, again, start + timedelta(days=1))
    stamp.write_text(str(part_rows))
    return out


def _pass1(out: Path, dest: Path) -> dict[str, object]:
    """Pass 1 alone (`segbatch.export.items.select`): the part of an export whose memory used to grow with rows."""
    import tempfile

    from segbatch.export.items import select

    with tempfile.TemporaryDirectory(dir=dest.parent) as work:
        sel = select(str(out), workdir=work)
    return {"rows": sel.rows, "images": sel.images, "annotations": None, "error_rows": sel.errors,
            "superseded": sel.superseded, "files": []}


def measure(out: Path, fmt: str, dest: Path) -> dict[str, object]:
    """One export (or, for `pass1`, pass 1 alone) in this (fresh) process."""
    from segbatch.export import export_output
    from segbatch.export.items import select  # noqa: F401 - an import, not the export's memory

    def rss_mb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    baseline = rss_mb()
    shutil.rmtree(dest, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    start, cpu_start = time.perf_counter(), cpu()
    summary = _pass1(out, dest) if fmt == "pass1" else export_output(str(out), fmt, dest=str(dest), tmp=str(dest.parent))
    elapsed, cpu_seconds = time.perf_counter() - start, cpu() - cpu_start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file()) if dest.exists() else 0
    shutil.rmtree(dest, ignore_errors=True)
    return {
        "format": fmt,
        "rows": summary["rows"],
        "images": summary["images"],
        "annotations": summary["annotations"],
        "error_rows": summary["error_rows"],
        "superseded": summary["superseded"],
        "seconds": round(elapsed, 1),
        "cpu_seconds": round(cpu_seconds, 1),
        "images_per_s": round(summary["images"] / elapsed, 1),
        "images_per_cpu_s": round(summary["images"] / cpu_seconds, 1),
        "peak_rss_mb": round(peak, 1),
        "baseline_rss_mb": round(baseline, 1),
        "peak_above_baseline_mb": round(peak - baseline, 1),
        "dest_mb": round(size / 2**20, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--part-rows", type=int, default=10_000, help="rows per committed metadata part")
    parser.add_argument("--formats", nargs="+", default=["coco", "cvat", "labelstudio"])
    parser.add_argument("--workdir", default="/tmp/segbatch-export-scale")
    parser.add_argument("--measure", nargs=3, metavar=("OUTPUT", "FORMAT", "DEST"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(Path(args.measure[0]), args.measure[1], Path(args.measure[2]))))
        return 0
    work = Path(args.workdir)
    t = time.perf_counter()
    out = generate(work, args.rows, args.part_rows)
    made = round(time.perf_counter() - t, 1)
    for fmt in args.formats:
        done = subprocess.run(
            [sys.executable, __file__, "--measure", str(out), fmt, str(work / f"n{args.rows}" / f"export-{fmt}")],
            capture_output=True, text=True,
        )
        if done.returncode:
            sys.stderr.write(done.stderr[-3000:])
            return done.returncode
        figures = {"rows": args.rows, "part_rows": args.part_rows, "cores": os.cpu_count(),
                   **json.loads(done.stdout.strip().splitlines()[-1]), "generate_seconds": made}
        print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
