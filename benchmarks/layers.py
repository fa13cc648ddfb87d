"""One two-layer job against the same two models as two jobs, on the same images, in one run.

Prints one JSON line:
  images                 scenes (builtin:shapes' generated scenes, `segbatch.synth`) in the input folder
  layered_wall_s         `segbatch run jobs/prelabel.yaml` (semantic + instance layers, one pass), wall clock
  separate_wall_s        the semantic layer's model alone, then the instance layer's, as two `segbatch run`s
  wall_ratio             separate_wall_s / layered_wall_s (above 1: one pass is faster)
  layered_steady_ips     images/s from the layered run's first to last result (start-up excluded)
  separate_steady_ips    images / (semantic's + instance's first-to-last result spans)
  steady_ratio           layered_steady_ips / separate_steady_ips
  layered_peak_rss_mb / separate_peak_rss_mb   peak summed RSS of each run's process tree (the larger of the two jobs)

Usage: python benchmarks/layers.py --images 64
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import run_measured  # noqa: E402

from segbatch.synth import write_scene_folder  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _run(job: dict, work: Path, name: str) -> tuple[float, float, int]:
    """(wall seconds, first-to-last result seconds, peak RSS bytes) of one `segbatch run`."""
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job))
    started = time.perf_counter()
    _, rss = run_measured([str(BIN / "segbatch"), "run", str(path), "--quiet"], cwd=work)
    wall = time.perf_counter() - started
    manifest = json.loads(next((Path(job["output"]["uri"]) / "runs").glob("*.json")).read_text())
    timing = manifest["timing"]
    return wall, timing["last_result_seconds"] - timing["first_result_seconds"], rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_scene_folder(work / "in", count=args.images, seed=10_200_000)
        layered = yaml.safe_load((ROOT / "jobs" / "prelabel.yaml").read_text())
        layered["input"]["uri"] = str(work / "in")
        layered["output"] = {"uri": str(work / "layered")}
        layered["run"] = {"max_error_fraction": 0.0}
        wall_l, span_l, rss_l = _run(layered, work, "layered")
        walls, spans, peaks = [], [], []
        for layer in layered["layers"]:
            alone = {**layered, "name": layer["name"], "model": {k: v for k, v in layer.items() if k != "name"}}
            alone.pop("layers")
            alone["output"] = {"uri": str(work / f"alone-{layer['name']}")}
            wall, span, rss = _run(alone, work, layer["name"])
            walls.append(wall)
            spans.append(span)
            peaks.append(rss)
    steady_l = args.images / span_l if span_l > 0 else 0.0
    steady_s = args.images / sum(spans) if sum(spans) > 0 else 0.0
    print(json.dumps({
        "images": args.images,
        "layered_wall_s": round(wall_l, 2),
        "separate_wall_s": round(sum(walls), 2),
        "wall_ratio": round(sum(walls) / wall_l, 3),
        "layered_steady_ips": round(steady_l, 2),
        "separate_steady_ips": round(steady_s, 2),
        "steady_ratio": round(steady_l / steady_s, 3) if steady_s else None,
        "layered_peak_rss_mb": round(rss_l / 2**20),
        "separate_peak_rss_mb": round(max(peaks) / 2**20),
    }))


if __name__ == "__main__":
    main()
