"""`segbatch demo`: make a small image folder and run `jobs/demo.yaml` on it, on a local Ray.

The images are synthetic scenes (see :mod:`segbatch.synth`) in several sizes and formats, plus one
corrupt file so the summary shows how a bad input becomes an error row instead of a dead job.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from segbatch.synth import write_scene_folder

__all__ = ["run_demo"]

DEMO_JOB = Path(__file__).resolve().parent.parent / "jobs" / "demo.yaml"


def run_demo(workdir: Path, job: Path = DEMO_JOB, images: int = 12) -> int:
    """Generate `images` scenes under `workdir/demo-data/images`, then run the demo job there."""
    from segbatch.cli import format_summary
    from segbatch.pipeline import run_job
    from segbatch.spec import load_job

    data = workdir / "demo-data" / "images"
    out = workdir / "demo-output"
    for folder in (data.parent, out):
        if folder.exists():
            shutil.rmtree(folder)
    write_scene_folder(data, count=images, seed=10_000_000)
    (data / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    (data / "README.txt").write_text("not an image: ignored by the listing\n")
    spec = load_job(job, [f"input.uri={data}", f"output.uri={out / 'semantic'}"])
    print(f"segbatch demo: {images} generated images + 1 corrupt file in {data}", flush=True)
    result = run_job(spec)
    print(format_summary(result), flush=True)
    return 1 if result.failed_budget else 0
