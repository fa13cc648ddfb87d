"""`segbatch demo`: fresh scenes with ground truth, one two-layer job on them, scored, exported, previewed.

What it does, on a local Ray:

1. writes `count` synthetic scenes (:mod:`segbatch.synth`, seeds from :data:`DEMO_SEED`, outside the
   training seeds) to `demo-data/images/` with their truth in `demo-data/truth/`, plus one corrupt
   JPEG so the run shows a bad input becoming an error row instead of a dead job;
2. runs `jobs/prelabel.yaml` over them: one pass, two layers (`builtin:shapes` semantic and instance),
   into `demo-output/semantic/` and `demo-output/instance/`;
3. scores each layer with `segbatch eval` (mIoU; COCO mask/box AP), writing `eval.json` next to it;
4. exports each layer for COCO, CVAT and Label Studio (`segbatch export`) and writes its preview page
   (`segbatch report`);
5. prints one screen: what was found, how well, how fast, where the masks, exports and reports are.

The demo is deterministic: the same seeds give the same scenes and (on the same machine) the same
masks. `--seed` picks other fresh scenes.
"""

from __future__ import annotations

import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segbatch.errors import JobError
from segbatch.synth import CLASSES, TRAIN_SEEDS, write_dataset

__all__ = ["DEMO_JOB", "DEMO_SEED", "EXPORT_FORMATS", "SCENE_JOB", "run_demo", "run_scene_demo"]

JOBS = Path(__file__).resolve().parent.parent / "jobs"
#: The demo's job: two layers (semantic, instance) over `demo-data/images/`, into `demo-output/<layer>/`.
DEMO_JOB = JOBS / "prelabel.yaml"
#: The scene demo's job (`segbatch demo --scene`): a georeferenced scene cut into windows.
SCENE_JOB = JOBS / "satellite.yaml"
#: First demo scene seed: the first seed after the training range, so no demo scene was trained on.
DEMO_SEED = TRAIN_SEEDS.stop
#: What the demo exports each layer as.
EXPORT_FORMATS = ("coco", "cvat", "labelstudio")


@dataclass
class _Outcome:
    """One layer of the demo job: its counts, scores, what it found, and where its files went."""

    task: str
    output: str
    layer: dict[str, Any]  # RunResult.layers[name]: ok, errors, output_uri
    report: dict[str, Any]
    report_uri: str
    found: Counter[str]
    weights_sha256: str
    exports: dict[str, str] = field(default_factory=dict)  # format -> destination (or why not)
    preview: str = ""


def _found(output_uri: str, task: str) -> tuple[Counter[str], str]:
    """What the layer found, by class name: pixels per class (semantic) or objects (instance); and its
    weights' sha256."""
    from segbatch.outputs import read_rows

    counts: Counter[str] = Counter()
    sha = ""
    for row in read_rows(output_uri, None, ["status", "class_pixels", "instances", "weights_sha256"]).to_pylist():
        if row["status"] != "ok":
            continue
        sha = row["weights_sha256"] or sha
        if task == "instance":
            counts.update(CLASSES[int(i["label"])] for i in row["instances"] or [])
        else:
            for label, pixels in enumerate(row["class_pixels"] or []):
                counts[CLASSES[label] if label < len(CLASSES) else str(label)] += int(pixels)
    return counts, sha


def _score_layer(name: str, task: str, output: str, layer: dict[str, Any], truth: Path) -> _Outcome:
    from segbatch.evaluate import evaluate_output, format_report, write_report

    print(f"\n== layer {name}: eval ==", flush=True)
    report = evaluate_output(output, str(truth if task == "semantic" else truth / "instances.json"))
    report_uri = write_report(report, output)
    print(format_report(report), flush=True)
    found, sha = _found(output, task)
    return _Outcome(task, output, layer, report, report_uri, found, sha)


def _export_layer(o: _Outcome) -> None:
    """The layer's exports for the three tools and its preview page (`segbatch export` / `report`)."""
    from segbatch.export import export_output
    from segbatch.export.report import write_report_html

    for fmt in EXPORT_FORMATS:
        try:
            o.exports[fmt] = export_output(o.output, fmt)["dest"]
        except ImportError as e:  # labelstudio's brush RLE comes with the `export` extra
            o.exports[fmt] = f"skipped: {e}"
    o.preview = write_report_html(o.output)["index"]


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


def format_demo_summary(count: int, seed: int, result: Any, outcomes: list[_Outcome]) -> str:
    """The closing screen: per layer what it found, its scores and where its outputs, exports and preview
    are; the job's speed once (both layers ran in one pass)."""
    images = result.new + result.changed + result.unfinished
    rate = images / result.stream_seconds if result.stream_seconds > 0 else 0.0
    lines = [
        "",
        "=" * 100,
        f"segbatch demo: {count} fresh scenes (seeds {seed}..{seed + count - 1}, none used in training) "
        "+ 1 corrupt file",
        f"one pass   {images} images through {len(outcomes)} layers · {rate:.1f} images/s "
        f"({result.wall_seconds:.0f} s including Ray and model start-up)",
    ]
    for o in outcomes:
        errors = ", ".join(f"{k} {v}" for k, v in o.layer["errors"].items()) or "none"
        out = o.output.rstrip("/")
        lines += [
            f"{o.task:<9} model {o.report.get('model')} (weights sha256 {o.weights_sha256[:12]})",
            f"{'':<9} images  ok {o.layer['ok']} · errors {errors}",
            f"{'':<9} found   {_found_line(o)}",
            f"{'':<9} quality {_quality_line(o)}",
            f"{'':<9} masks   {out}/masks/ · metadata {out}/metadata/ · eval {o.report_uri}",
            *(f"{'':<9} {fmt:<11} {dest}" for fmt, dest in o.exports.items()),
            f"{'':<9} preview {o.preview}  (open it in a browser: overlays, worst first)",
        ]
    lines += [
        "import     CVAT: create a task with demo-data/images, then Actions → Upload annotations → 'CVAT 1.1' → "
        "a task-*.zip from cvat/",
        "           Label Studio: a project with labelstudio/labeling_config.xml, then Import → labelstudio/tasks.json "
        "(README, 'Pre-labelling for CVAT and Label Studio')",
        "=" * 100,
    ]
    return "\n".join(lines)


def run_demo(workdir: Path, count: int = 48, seed: int = DEMO_SEED, job: Path = DEMO_JOB) -> int:
    """Generate the scenes, run the two-layer job, score, export and preview each layer; returns the exit
    code (1: the job failed its error budget)."""
    import ray

    from segbatch.pipeline import run_job
    from segbatch.result import format_summary
    from segbatch.spec import load_job

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
    spec = load_job(job, [f"input.uri={images}", f"output.uri={out}"])
    layers = ", ".join(f"{name} ({j.first_model.task}, {j.first_model.weights})" for name, j in spec.layer_jobs())
    print(f"\n== {job.name}: layers {layers} ==", flush=True)
    started = not ray.is_initialized()
    if started:  # a local Ray the demo owns (run_job leaves a Ray it did not start running)
        ray.init(address="local", include_dashboard=False, logging_level="WARNING")
    try:
        result = run_job(spec)
    finally:
        if started:
            ray.shutdown()
    print(format_summary(result), flush=True)
    outcomes = []
    for name, layer_job in spec.layer_jobs():
        output = layer_job.output.uri
        outcome = _score_layer(name, layer_job.first_model.task, output, result.layers[name], truth)
        _export_layer(outcome)
        outcomes.append(outcome)
    print(format_demo_summary(count, seed, result, outcomes), flush=True)
    return 1 if result.failed_budget else 0


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
