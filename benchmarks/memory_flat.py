"""Peak memory of a job is flat in dataset size: the same job over N and 10×N images.

Prints one JSON line: peak summed RSS (driver + Ray workers) of `segbatch run` for each size and their
ratio. Small images and a small model keep the large run to a couple of minutes on a laptop CPU.

Usage: python benchmarks/memory_flat.py --small 200 --large 2000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import make_jpegs, run_measured  # noqa: E402

BIN = Path(sys.executable).parent


def peak_for(work: Path, count: int, size: int, arch: str) -> tuple[int, float]:
    images = work / f"images-{size}-{count}"
    make_jpegs(images, count, size, size, seed=count)
    out = work / f"out-{count}-{time.strftime('%Y%m%d-%H%M%S')}"  # fresh: one manifest, nothing to skip
    job = {
        "name": f"memory-{count}",
        "input": {"uri": str(images)},
        "model": {"task": "semantic", "arch": arch, "weights": "none", "num_classes": 4, "batch_size": 8},
        "output": {"uri": str(out), "commit_rows": 200},
        "compute": {"actors": 1, "cpus_per_actor": 1, "cpus_per_loader": 0.5},
    }
    path = work / f"job-{count}.yaml"
    path.write_text(yaml.safe_dump(job))
    _, peak = run_measured([str(BIN / "segbatch"), "run", str(path)])
    manifest = json.loads(next((out / "runs").glob("*.json")).read_text())
    assert manifest["counts"]["ok"] == count, manifest["counts"]
    return peak, manifest["timing"]["wall_seconds"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=int, default=200)
    parser.add_argument("--large", type=int, default=2000)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--arch", default="segbatch.models.small:unet_small")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="segbatch-mem-"))
    small, small_s = peak_for(work, args.small, args.size, args.arch)
    large, large_s = peak_for(work, args.large, args.size, args.arch)
    print(
        json.dumps(
            {
                "small_images": args.small,
                "large_images": args.large,
                "size": args.size,
                "small_peak_rss_mb": round(small / 2**20, 1),
                "large_peak_rss_mb": round(large / 2**20, 1),
                "ratio": round(large / small, 3),
                "small_wall_s": small_s,
                "large_wall_s": large_s,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
