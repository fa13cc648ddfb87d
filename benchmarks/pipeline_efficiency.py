"""End-to-end throughput as a fraction of what the model alone does, on the same JPEGs, in one run.

Prints one JSON line (and nothing else on stdout):
  model_only_ips   the model alone on pre-decoded arrays: to-tensor, normalise, forward, argmax
                   (instance: threshold, crop, RLE), same batch size, on the machine's cores: the better of
                   one pass on all cores (`model_only_one_pass_ips`) and the cores split into concurrent
                   passes as the CPU actor splits them, 1 thread each up to 4 cores (`model_only_streams_ips`).
                   Measured before and after the end-to-end runs and averaged; `model_only_drift` = after /
                   before shows how far the machine moved meanwhile.
  end_to_end_ips   `segbatch run` in steady state: the job over N and over 2N images, extra images / extra
                   seconds from first to last result (Ray start, actor start, model load and the final
                   commit are outside that span, and what is left of start-up is paid by both and cancels)
  naive_loop_ips   one process: open, decode, forward, save PNG, image after image
  ray_baseline_ips the straightforward Ray Data version (`read_images` + `map_batches` actor pool + save),
                   timed the same way (N and 2N images)
  efficiency       end_to_end_ips / model_only_ips; with `--repeats R` everything is measured in R rounds and each
                   end-to-end figure is divided by the model-only figures measured just before and after it: the
                   median of those ratios (`efficiency_repeats` lists them). Baselines and the end-to-end figure
                   are medians over rounds; `end_to_end_over_naive` / `_over_ray_baseline` are the medians of each
                   round's ratio (above 1: ahead)
  peak_rss_mb      peak summed RSS of the `segbatch run` process tree (driver + Ray workers)

Usage: python benchmarks/pipeline_efficiency.py --images 64 --arch lraspp_mobilenet_v3_large --batch-size 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import make_jpegs, run_measured  # noqa: E402

from segbatch.masks import encode_png_label_map  # noqa: E402
from segbatch.models import Predictor, resolve_weights  # noqa: E402
from segbatch.layout import ActorLayout, StreamGate, decide_layout, stream_threads  # noqa: E402
from segbatch.pipeline import load_block_rows  # noqa: E402
from segbatch.spec import INSTANCE_ARCHS, ComputeSpec, ModelSpec, PredictSettings  # noqa: E402

BIN = Path(sys.executable).parent


def _predictor(task: str, arch: str, batch_size: int, threads: int) -> Predictor:
    spec = ModelSpec(task=task, arch=arch, weights="none", num_classes=21 if task == "semantic" else 4, batch_size=batch_size)
    torch.set_num_threads(threads)
    settings = PredictSettings(batch_size=batch_size, score_threshold=0.05)
    return Predictor(task, resolve_weights(spec), settings, ActorLayout(threads=threads))


def model_only(pred: Predictor, images: list[np.ndarray], batch_size: int, streams: int = 1) -> float:
    """Images/s of the predictor's tensor path, its cores split into `streams` concurrent passes.

    The passes get their threads from the actor's own gate (:class:`StreamGate`), so the layout is
    the one a job's CPU actor runs on a one-node CPU pool (:func:`segbatch.layout.decide_layout`).
    """
    run = pred.predict_semantic if pred.task == "semantic" else pred.predict_instance
    threads = torch.get_num_threads()
    gate = StreamGate(stream_threads(threads, streams))
    batches = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]

    def one(batch: list[np.ndarray]) -> None:
        with gate.slot() as own_threads:
            torch.set_num_threads(own_threads)
            run(batch)

    with ThreadPoolExecutor(streams) as pool:
        list(pool.map(one, batches[:streams]))  # warm-up, each thread once
        start = time.perf_counter()
        list(pool.map(one, batches))
        elapsed = time.perf_counter() - start
    torch.set_num_threads(threads)
    return len(images) / elapsed


def model_only_pair(pred: Predictor, images: list[np.ndarray], batch_size: int, cores: int) -> tuple[float, float]:
    """(one pass on all cores, the cores split into concurrent passes as a job's CPU actor splits them) images/s."""
    one_pass = model_only(pred, images, batch_size)
    streams = decide_layout(ComputeSpec(actors=1), cores).streams if pred.device.type == "cpu" else 1
    return one_pass, (model_only(pred, images, batch_size, streams) if streams > 1 else one_pass)


def naive_loop(pred: Predictor, paths: list[Path], out: Path) -> float:
    out.mkdir(parents=True, exist_ok=True)
    run = pred.predict_semantic if pred.task == "semantic" else pred.predict_instance
    run([np.asarray(Image.open(paths[0]).convert("RGB"))])  # warm-up
    start = time.perf_counter()
    for path in paths:
        image = np.asarray(Image.open(path).convert("RGB"))
        result = run([image])[0]
        labels = result[0] if pred.task == "semantic" else result[1]
        if labels.size:
            (out / f"{path.name}.png").write_bytes(encode_png_label_map(labels))
    return len(paths) / (time.perf_counter() - start)


def _segbatch_run(args: argparse.Namespace, images: Path, work: Path, load_rows: int) -> tuple[dict, int, str | None]:
    out = work / f"e2e-out-{images.name}-{time.strftime('%Y%m%d-%H%M%S')}"  # fresh: a rerun would skip all
    job = {
        "name": "bench",
        "input": {"uri": str(images)},
        "model": {
            "task": args.task,
            "arch": args.arch,
            "weights": "none",
            "num_classes": 21 if args.task == "semantic" else 4,
            "batch_size": args.batch_size,
            "score_threshold": 0.05,
        },
        "output": {"uri": str(out), "instance_png": args.task == "instance"},
        # The product's defaults: one actor reserving one CPU whose torch threads share the machine's cores (one-node
        # Ray), one CPU per load task; tune with --set. Both runs of a pair get the load blocks the smaller one
        # would (a small job's blocks shrink), so their first results carry alike many images.
        "compute": {"actors": 1, "load_batch_size": load_rows},
    }
    path = work / "bench.yaml"
    path.write_text(yaml.safe_dump(job))
    done, peak = run_measured([str(BIN / "segbatch"), "run", str(path), *sum((["--set", s] for s in args.set), [])])
    # The driver logs the layout it gave the actors (segbatch/layout.py).
    lines = (done.stdout + done.stderr).splitlines()
    choice = next((line.split("predict actors: ", 1)[1].strip() for line in lines if "predict actors: " in line), None)
    return json.loads(next((out / "runs").glob("*.json")).read_text()), peak, choice


def end_to_end(args: argparse.Namespace, small: Path, large: Path, work: Path) -> tuple[float, int, dict, str | None]:
    """Steady-state images/s from two dataset sizes: the extra images over the extra time.

    Both runs pay the same start-up (Ray, actors, model load), so it cancels in the difference.
    """
    defaults = ComputeSpec(actors=1)
    load_rows = load_block_rows(
        defaults.load_batch_size, args.images, decide_layout(defaults, os.cpu_count()).streams, args.batch_size
    )
    first, _, _ = _segbatch_run(args, small, work, load_rows)
    second, peak, choice = _segbatch_run(args, large, work, load_rows)

    def span(manifest: dict) -> float:
        return manifest["timing"]["last_result_seconds"] - manifest["timing"]["first_result_seconds"]

    extra_images = second["counts"]["ok"] - first["counts"]["ok"]
    return extra_images / (span(second) - span(first)), peak, second, choice


def ray_baseline(args: argparse.Namespace, small: Path, large: Path, work: Path) -> float:
    """The Ray Data baseline timed like `end_to_end`: N and 2N images, extra images / extra seconds."""

    def wall(images: Path) -> tuple[int, float]:
        done, _ = run_measured(
            [sys.executable, str(Path(__file__).with_name("ray_baseline.py")), str(images), str(work / f"ray-out-{images.name}"),
             "--arch", args.arch, "--batch-size", str(args.batch_size)]
        )
        figures = json.loads(done.stdout.strip().splitlines()[-1])
        # Whole runs, not spans of results: its results arrive in bursts of `read_images` blocks, so
        # the first result can come late in one run and early in the other.
        return figures["images"], figures["wall_seconds"]

    n1, t1 = wall(small)
    n2, t2 = wall(large)
    return (n2 - n1) / (t2 - t1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--arch", default="lraspp_mobilenet_v3_large")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--workdir", default=None, help="where images and outputs go (default: a temp dir)")
    parser.add_argument("--skip-baselines", action="store_true", help="only model-only and end-to-end")
    parser.add_argument("--repeats", type=int, default=1, help="end-to-end / model-only pairs to alternate (median)")
    parser.add_argument("--set", action="append", default=[], help="extra job overrides for the end-to-end run")
    args = parser.parse_args()
    args.task = "instance" if args.arch in INSTANCE_ARCHS or "maskrcnn" in args.arch else "semantic"
    work = Path(args.workdir or tempfile.mkdtemp(prefix="segbatch-bench-"))
    images = work / f"images-{args.height}x{args.width}-{args.images}"
    paths = make_jpegs(images, args.images, args.height, args.width)
    double = work / f"images-{args.height}x{args.width}-{2 * args.images}"
    make_jpegs(double, 2 * args.images, args.height, args.width, seed=1)
    cores = os.cpu_count() or 1

    pred = _predictor(args.task, args.arch, args.batch_size, cores)
    decoded = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    figures: dict[str, object] = {
        "arch": args.arch,
        "images": args.images,
        "size": f"{args.height}x{args.width}",
        "batch_size": args.batch_size,
        "cores": cores,
        "device": str(pred.device),
    }
    # Everything is measured in rounds, each figure compared only with its neighbours: this machine's
    # speed wanders by tens of percent over minutes.
    model = [model_only_pair(pred, decoded, args.batch_size, cores)]  # (one pass, streams) per measurement
    e2es: list[float] = []
    naives: list[float] = []
    rays: list[float] = []
    for _ in range(max(1, args.repeats)):
        if not args.skip_baselines:
            naives.append(naive_loop(pred, paths, work / "naive-out"))
        e2e, peak, manifest, choice = end_to_end(args, images, double, work)
        e2es.append(e2e)
        if not args.skip_baselines:
            rays.append(ray_baseline(args, images, double, work))
        model.append(model_only_pair(pred, decoded, args.batch_size, cores))
    del pred, decoded
    figures["model_only_one_pass_ips"] = statistics.mean(m[0] for m in model)
    figures["model_only_streams_ips"] = statistics.mean(m[1] for m in model)
    figures["model_only_ips"] = max(figures["model_only_one_pass_ips"], figures["model_only_streams_ips"])
    figures["model_only_drift"] = max(model[-1]) / max(model[0])
    if choice:
        figures["actor_threads"] = choice
    figures["end_to_end_ips"] = statistics.median(e2es)
    figures["end_to_end_wall_ips"] = manifest["timing"]["images_per_second"]
    figures["end_to_end_manifest_steady_ips"] = manifest["timing"]["steady_images_per_second"]
    figures["peak_rss_mb"] = round(peak / 2**20, 1)
    # Each end-to-end figure against the model's best layout measured just before and after it.
    ratios = [e / ((max(model[i]) + max(model[i + 1])) / 2) for i, e in enumerate(e2es)]
    figures["efficiency"] = statistics.median(ratios)
    if len(ratios) > 1:
        figures["efficiency_repeats"] = [round(r, 3) for r in ratios]
    if naives:
        figures["naive_loop_ips"] = statistics.median(naives)
        figures["ray_baseline_ips"] = statistics.median(rays)
        # The same round's end-to-end figure over each baseline: above 1 means ahead.
        figures["end_to_end_over_naive"] = statistics.median(e / n for e, n in zip(e2es, naives))
        figures["end_to_end_over_ray_baseline"] = statistics.median(e / r for e, r in zip(e2es, rays))
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
