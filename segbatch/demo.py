"""`segbatch demo`: fresh scenes with ground truth, two jobs on them, both scored, one summary.

What it does, on a local Ray:

1. writes `count` synthetic scenes (:mod:`segbatch.synth`, seeds from :data:`DEMO_SEED`, outside the
   training seeds) to `demo-data/images/` with their truth in `demo-data/truth/`, plus one corrupt
   JPEG so the run shows a bad input becoming an error row instead of a dead job;
2. runs `jobs/demo.yaml` (semantic, `builtin:shapes`) and `jobs/demo-instance.yaml` (instance,
   `builtin:shapes`) over them, into `demo-output/semantic/` and `demo-output/instance/`;
3. scores both with `segbatch eval` (mIoU; COCO mask/box AP) and writes `eval.json` next to each;
4. prints one screen: what was found, how well, how fast, where the masks are.

The demo is deterministic: the same seeds give the same scenes and (on the same machine) the same
masks. `--seed` picks other fresh scenes.
"""

from __future__ import annotations

import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from segbatch.errors import JobError
from segbatch.synth import CLASSES, TRAIN_SEEDS, write_dataset

__all__ = ["DEMO_JOBS", "DEMO_SEED", "SCENE_JOB", "run_demo", "run_scene_demo"]

JOBS = Path(__file__).resolve().parent.parent / "jobs"
#: The demo's jobs, by task: each reads `demo-data/images/` and writes `demo-output/<task>/`.
DEMO_JOBS = {"semantic": JOBS / "demo.yaml", "instance": JOBS / "demo-instance.yaml"}
#: The scene demo's job (`segbatch demo --scene`): a georeferenced scene cut into windows.
SCENE_JOB = JOBS / "satellite.yaml"
#: First demo scene seed: the first seed after the training range, so no demo scene was trained on.
DEMO_SEED = TRAIN_SEEDS.stop


@dataclass
class _Outcome:
    task: str
    result: Any  # segbatch.result.RunResult
    report: dict[str, Any]
    report_uri: str
    found: Counter[str]


def _found(output_uri: str, task: str) -> Counter[str]:
    """What the job found, by class name: pixels share per class (semantic) or objects (instance)."""
    from segbatch.outputs import read_rows

    counts: Counter[str] = Counter()
    for row in read_rows(output_uri, None, ["status", "class_pixels", "instances"]).to_pylist():
        if row["status"] != "ok":
            continue
        if task == "instance":
            counts.update(CLASSES[int(i["label"])] for i in row["instances"] or [])
        else:
            for label, pixels in enumerate(row["class_pixels"] or []):
                counts[CLASSES[label] if label < len(CLASSES) else str(label)] += int(pixels)
    return counts


def _run_one(task: str, job: Path, images: Path, truth: Path, out: Path) -> _Outcome:
    from segbatch.evaluate import evaluate_output, format_report, write_report
    from segbatch.pipeline import run_job
    from segbatch.result import format_summary
    from segbatch.spec import load_job

    spec = load_job(job, [f"input.uri={images}", f"output.uri={out}"])
    print(f"\n== {task}: {job.name} ({spec.model.weights}) ==", flush=True)
    result = run_job(spec)
    print(format_summary(result), flush=True)
    report = evaluate_output(str(out), str(truth if task == "semantic" else truth / "instances.json"))
    report_uri = write_report(report, str(out))
    print(format_report(report), flush=True)
    return _Outcome(task, result, report, report_uri, _found(str(out), task))


def _quality_line(o: _Outcome) -> str:
    m = o.report["metrics"]
    if o.task == "semantic":
        per = " · ".join(
            f"{name} {c['iou']:.3f}" for name, c in o.report["per_class"].items() if c["iou"] is not None
        )
        return f"mIoU {m['mIoU']:.3f} ({per})"
    s = m["segm"]
    tiny = "-" if s.get("APtiny") is None else f"{s['APtiny']:.3f}"
    occ = s.get("occluded") or {}
    occ_text = f" · occluded objects found {occ['recall50']:.0%}" if occ.get("recall50") is not None else ""
    return f"mask AP {s['AP']:.3f} · AP50 {s['AP50']:.3f} · AP75 {s['AP75']:.3f} · tiny AP {tiny}{occ_text}"


def _found_line(o: _Outcome) -> str:
    if o.task == "instance":
        return ", ".join(f"{n} {o.found[n]}" for n in CLASSES[1:]) + " objects"
    total = sum(o.found.values()) or 1
    return ", ".join(f"{n} {o.found[n] / total:.1%}" for n in CLASSES) + " of pixels"


def format_demo_summary(count: int, seed: int, outcomes: list[_Outcome]) -> str:
    """The closing screen: per job what it found, its scores, its speed and where its outputs are."""
    lines = [
        "",
        "=" * 100,
        f"segbatch demo: {count} fresh scenes (seeds {seed}..{seed + count - 1}, none used in training) "
        "+ 1 corrupt file",
    ]
    for o in outcomes:
        r = o.result
        errors = ", ".join(f"{k} {v}" for k, v in r.errors.items()) or "none"
        out = r.output_uri.rstrip("/")
        lines += [
            f"{o.task:<9} model {o.report.get('model')} (weights sha256 {r.weights_sha256[:12]})",
            f"{'':<9} images  ok {r.ok} · errors {errors} · {r.images_per_second:.1f} images/s "
            f"({r.wall_seconds:.0f} s including Ray and model start-up)",
            f"{'':<9} found   {_found_line(o)}",
            f"{'':<9} quality {_quality_line(o)}",
            f"{'':<9} masks   {out}/masks/ · metadata {out}/metadata/ · report {o.report_uri}",
        ]
    lines.append("=" * 100)
    return "\n".join(lines)


def run_demo(workdir: Path, count: int = 48, seed: int = DEMO_SEED, jobs: dict[str, Path] | None = None) -> int:
    """Generate the scenes, run and score both demo jobs; returns the exit code (1: a job failed its budget)."""
    import ray

    if seed in TRAIN_SEEDS or seed + count - 1 in TRAIN_SEEDS:
        raise JobError(f"segbatch demo: seeds {seed}..{seed + count - 1} overlap the training seeds {TRAIN_SEEDS}")
    root, out = workdir / "demo-data", workdir / "demo-output"
    for folder in (root, out):
        if folder.exists():
            shutil.rmtree(folder)
    images, truth = write_dataset(root, count, seed)
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    (images / "README.txt").write_text("not an image: ignored by the listing\n")
    print(f"segbatch demo: {count} scenes + 1 corrupt file in {images}, truth in {truth}", flush=True)
    outcomes: list[_Outcome] = []
    started = not ray.is_initialized()
    if started:  # one local Ray for both jobs (run_job leaves a Ray it did not start running)
        ray.init(address="local", include_dashboard=False, logging_level="WARNING")
    try:
        for task, job in (jobs or DEMO_JOBS).items():
            outcomes.append(_run_one(task, job, images, truth, out / task))
    finally:
        if started:
            ray.shutdown()
    print(format_demo_summary(count, seed, outcomes), flush=True)
    return 1 if any(o.result.failed_budget for o in outcomes) else 0


def format_scene_summary(result: Any, report: dict[str, Any], scene_row: dict[str, Any]) -> str:
    """The scene demo's closing screen: windows, scores, and where the COG and the GeoParquet are."""
    m, o = report["metrics"], report["objects"]
    errors = ", ".join(f"{k} {v}" for k, v in result.errors.items()) or "none"
    cog, polygons = scene_row["mask_uri"], scene_row["polygons_uri"]
    return "\n".join(
        [
            "",
            "=" * 100,
            f"segbatch demo --scene: one {scene_row['width']}x{scene_row['height']} px scene (EPSG:32633), "
            f"{scene_row['windows']} windows of {SCENE_TILE}",
            f"windows  ok {result.ok} · errors {errors} · {result.images_per_second:.1f} windows/s "
            f"({result.wall_seconds:.0f} s including Ray and model start-up)",
            f"quality  mIoU {m['mIoU']:.3f} · objects truth {o['truth']} · predicted {o['predicted']} · "
            f"matched {o['matched']} (IoU >= {o['match_iou']})",
            f"COG      {cog}",
            f"polygons {polygons}  ({scene_row['polygons']} polygons, GeoParquet 1.1)",
            "open     QGIS: drag both files onto the map (same CRS, they overlay the input scene)",
            f"         python: geopandas.read_parquet('{polygons}') · rasterio.open('{cog}')",
            f"         duckdb: SELECT class_name, count(*) FROM '{polygons}' GROUP BY 1",
            "=" * 100,
        ]
    )


SCENE_TILE = "512 px, 64 px overlap"


def run_scene_demo(workdir: Path, seed: int = DEMO_SEED, job: Path = SCENE_JOB) -> int:
    """Write a georeferenced scene with truth, run `jobs/satellite.yaml` on it, score it, print the screen."""
    from segbatch.evaluate import evaluate_output, format_report, write_report
    from segbatch.geo.scenes import read_scene_rows
    from segbatch.pipeline import run_job
    from segbatch.result import format_summary
    from segbatch.spec import load_job
    from segbatch.synth import write_geo_scene

    root, out = workdir / "demo-scenes", workdir / "demo-output" / "scenes"
    for folder in (root, out):
        if folder.exists():
            shutil.rmtree(folder)
    scene = write_geo_scene(
        root / "in" / "scene.tif", width=1600, height=1200, spacing=150, shape_size=(60.0, 100.0), seed=seed,
        truth=root / "truth",
    )
    print(f"segbatch demo --scene: {scene.path} ({scene.objects} shapes), truth in {root / 'truth'}", flush=True)
    spec = load_job(job, [f"input.uri={root / 'in'}", f"output.uri={out}"])
    result = run_job(spec)
    print(format_summary(result), flush=True)
    report = evaluate_output(str(out), str(root / "truth"))
    write_report(report, str(out))
    print(format_report(report), flush=True)
    row = read_scene_rows(str(out), None).to_pylist()[-1]
    print(format_scene_summary(result, report, row), flush=True)
    return 1 if result.failed_budget or row["status"] != "ok" else 0
