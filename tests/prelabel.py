"""Real outputs for the export and report tests: generated scenes, the shipped `builtin:shapes` models,
a semantic and an instance job on a local Ray, plus one corrupt image (an error row)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SCENES = 10
SEED = 10_600_000  # fresh: outside segbatch.synth.TRAIN_SEEDS and the demo's seeds


@dataclass(frozen=True)
class ShapesOutputs:
    images: Path
    truth: Path
    semantic: Path
    instance: Path


def make_outputs(root: Path) -> ShapesOutputs:
    """Write SCENES scenes and a broken JPEG under `root`, run both demo jobs on them (local Ray)."""
    import ray

    from segbatch.pipeline import run_job
    from segbatch.spec import parse_job
    from segbatch.synth import write_dataset

    images, truth = write_dataset(root / "data", count=SCENES, seed=SEED)
    (images / "batch-a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        outs = {}
        for task in ("semantic", "instance"):
            model = {"task": task, "weights": "builtin:shapes", "batch_size": 4}
            if task == "instance":
                model["score_threshold"] = 0.3
            spec = parse_job(
                {
                    "name": f"prelabel-{task}",
                    "input": {"uri": str(images)},
                    "model": model,
                    "output": {"uri": str(root / "out" / task)},
                    "compute": {"actors": 1, "cpus_per_actor": 1, "load_batch_size": 4},
                    "run": {"max_error_fraction": 0.5},
                }
            )
            run_job(spec)
            outs[task] = root / "out" / task
    finally:
        if started:
            ray.shutdown()
    return ShapesOutputs(images, truth, outs["semantic"], outs["instance"])
