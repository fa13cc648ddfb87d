"""Weighted blending's assembly memory (`tiling.blend: weighted`): peak RSS of the driver step that blends
a scene's probability parts into the label raster, for scenes of one width and several heights, against
the buffers the docstring of `segbatch.geo.blend` predicts (C x window height x width float32 + a bool
band), and the size of the probability parts.

1. For each height, writes the probability parts of every window of the job's grid (512/64 aligned to
   512² blocks: 576-px windows) as the write stage does (`encode_probs`, float16, compressed), with
   smooth class fields that depend on scene coordinates only (so windows agree, as with a real model).
2. Runs `assemble_blended` in a fresh process and reads its peak RSS (`ru_maxrss`), minus the same
   process's RSS after its imports (rasterio, numpy, segbatch).

Usage: PYTHONPATH=. python benchmarks/scene_blend.py --width 8192 --heights 2048 8192
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from segbatch.geo.blend import encode_probs
from segbatch.geo.read import SceneHeader
from segbatch.geo.stitch import part_uri
from segbatch.geo.windows import grid

ASSEMBLE = """
import json, resource, sys, time
from pathlib import Path
from segbatch.geo.blend import assemble_blended
from segbatch.geo.read import SceneHeader
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
args = json.loads(sys.argv[1])
header = SceneHeader(**args["header"])
start = time.perf_counter()
assemble_blended(header, args["out"], None, "scene.tif", args["size"], args["overlap"], "uint8", Path(args["raster"]))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"base_mb": round(base / 1024, 1), "peak_mb": round(peak / 1024, 1), "seconds": round(time.perf_counter() - start, 2)}))
"""


def fields(x0: int, y0: int, w: int, h: int, classes: int) -> np.ndarray:
    """Softmax of smooth per-class fields over scene coordinates (C x h x w float32)."""
    ys, xs = np.mgrid[y0 : y0 + h, x0 : x0 + w].astype(np.float32)
    logits = np.stack([np.sin(xs / (97 + 31 * c)) + np.cos(ys / (83 + 17 * c)) for c in range(classes)])
    e = np.exp(3 * (logits - logits.max(axis=0)))
    return e / e.sum(axis=0)


def one_height(width: int, height: int, classes: int, size: int, overlap: int, work: Path) -> dict[str, object]:
    header = SceneHeader(width=width, height=height, count=3, dtype="uint8", nodata=None, crs_wkt=None,
                         transform=(1.0, 0.0, 0.0, 0.0, -1.0, 0.0), block=(512, 512))
    out = work / f"out-{height}"
    wins = grid(width, height, size, overlap, header.block)
    npz_bytes = 0
    for w in wins:
        probs = fields(w.col_off, w.row_off, w.width, w.height, classes)
        data = encode_probs(probs, np.zeros((0, 0), bool))
        path = Path(part_uri(str(out), "scene.tif", w, "npz"))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        npz_bytes += len(data)
    args = {"header": {f: getattr(header, f) for f in header.__slots__}, "out": str(out), "size": size,
            "overlap": overlap, "raster": str(work / f"labels-{height}.tif")}
    done = subprocess.run([sys.executable, "-c", ASSEMBLE, json.dumps(args)], capture_output=True, text=True, check=True)
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    band = max(w.height for w in wins)
    predicted = (classes * band * width * 4 + band * width) / 2**20
    return {"width": width, "height": height, "windows": len(wins), "window": band,
            "parts_npz_mb": round(npz_bytes / 1e6, 1), "parts_bytes_per_scene_pixel": round(npz_bytes / (width * height), 2),
            "predicted_buffers_mib": round(predicted, 1), "peak_minus_imports_mb": round(measured["peak_mb"] - measured["base_mb"], 1),
            **measured}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=8192)
    parser.add_argument("--heights", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--overlap", type=int, default=64)
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="segbatch-blend-") as tmp:
        runs = [one_height(args.width, h, args.classes, args.size, args.overlap, Path(tmp)) for h in args.heights]
    print(json.dumps({"classes": args.classes, "tiling": [args.size, args.overlap], "runs": runs,
                      "wall_s": round(time.perf_counter() - started, 1)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
