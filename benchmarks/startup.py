"""Start-up of the `segbatch` command as a user meets it: one JSON line.

Each figure is a fresh `segbatch` process, timed from its start:

- `validate_s`: `segbatch validate JOB` (no storage, no torch, no Ray);
- `run_first_result_s`: `segbatch run JOB` on a small job, process start to the first result rows
  (imports, planning, Ray start, actor start and model load, the first batch);
- `run_wall_s`: the same run to its exit (the last results, the commit, Ray shutdown);
- `rerun_nothing_s`: the same job again, everything already committed (nothing to do);
- `rerun_imports_torch` / `rerun_imports_ray`: whether that rerun imported torch or Ray at all.

Usage: python benchmarks/startup.py [--images 20] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import yaml

from segbatch.synth import write_scene_folder

# Runs the CLI in-process, then reports which heavy modules that command imported (Ray cannot start
# without `ray` being imported).
PROBE = (
    "import sys; from segbatch.cli import main; rc = main(sys.argv[1:]); "
    "print('PROBE', 'torch' in sys.modules, 'ray' in sys.modules, flush=True); sys.exit(rc)"
)


def _timed(cmd: list[str]) -> tuple[float, str]:
    started = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return time.time() - started, proc.stdout


def measure(root: Path, images: int) -> dict[str, float | bool]:
    segbatch = str(Path(sys.executable).with_name("segbatch"))
    write_scene_folder(root / "in", count=images, seed=10_000_000)
    job = root / "job.yaml"
    out = root / "out"
    shutil.rmtree(out, ignore_errors=True)
    job.write_text(
        yaml.safe_dump(
            {
                "name": "startup",
                "input": {"uri": str(root / "in")},
                "model": {"task": "semantic", "weights": "builtin:shapes"},
                "output": {"uri": str(out)},
            }
        )
    )
    validate_s, _ = _timed([segbatch, "validate", str(job)])
    wall_s, _ = _timed([segbatch, "run", str(job), "--quiet"])
    manifest = json.loads(next((out / "runs").glob("*.json")).read_text())
    timing = manifest["timing"]
    # Process start → run_job start is the process's wall time not inside run_job.
    outside = wall_s - timing["wall_seconds"]
    before_stream = timing["wall_seconds"] - timing["stream_seconds"]
    first_result_s = outside + before_stream + timing["first_result_seconds"]
    rerun_s, stdout = _timed([sys.executable, "-c", PROBE, "run", str(job), "--quiet"])
    probe = next(line for line in stdout.splitlines() if line.startswith("PROBE")).split()
    return {
        "validate_s": round(validate_s, 2),
        "run_first_result_s": round(first_result_s, 2),
        "run_wall_s": round(wall_s, 2),
        "rerun_nothing_s": round(rerun_s, 2),
        "rerun_imports_torch": probe[1] == "True",
        "rerun_imports_ray": probe[2] == "True",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=1, help="median over this many rounds")
    args = parser.parse_args()
    rounds = []
    with tempfile.TemporaryDirectory(prefix="segbatch-startup-") as tmp:
        for _ in range(args.repeats):
            rounds.append(measure(Path(tmp), args.images))
    figures = {k: median(r[k] for r in rounds) if isinstance(rounds[0][k], float) else rounds[-1][k] for k in rounds[0]}
    print(json.dumps({"benchmark": "startup", "images": args.images, "repeats": args.repeats, **figures}))


if __name__ == "__main__":
    main()
