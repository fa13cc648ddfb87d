"""Scene throughput and bytes read: windows/s end to end against the model alone, and bytes fetched
from S3 against the bytes the windows need.

1. Writes a side x side RGB scene as a COG-like tiled GeoTIFF (512² blocks, DEFLATE).
2. **Bytes**: starts a moto S3 server, uploads the scene, and reads every window of the job's grid
   (tiling 512/64) the way load tasks do (:func:`segbatch.geo.read.open_scene`, rasterio with the s3fs
   filesystem as `opener`), counting the bytes s3fs fetches; once with segbatch's settings (2 MiB
   `blockcache`), with 256 KiB and 1 MiB blocks, and with s3fs' defaults (50 MiB read-ahead), opening
   the scene once per load task of `--task-windows` windows in grid order. "Needed" is the sum of the compressed
   sizes of the internal blocks each window overlaps (blocks shared by windows counted once per window),
   plus nothing for the header. The grid is the one a job plans (aligned to the scene's 512² blocks:
   576-px windows every 512 px); `--plain-grid` reads the plain 512/64 grid instead, for comparison.
3. **Windows/s**: `segbatch run` (local Ray, subprocess) on the local scene: windows / stream seconds,
   and windows between first and last results / that span (steady); against the predictor alone on the
   same windows (pre-read arrays, same batch size, the better of one pass and the actor's streams).
   With `--double`, also a scene of sqrt(2) x the side (about twice the windows): the extra windows over
   the extra first-to-last seconds (`marginal_windows_per_s`, start-up paid by both runs cancels, as
   `pipeline_efficiency.py` measures images), over the model alone (`efficiency_marginal`).

Usage: PYTHONPATH=. python benchmarks/scene_throughput.py --side 4096 --arch segbatch.models.small:unet_small
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scene_memory import write_big_scene  # noqa: E402

from tests.s3bytes import counting_s3_fetches  # noqa: E402

BIN = Path(sys.executable).parent


def _moto() -> tuple[subprocess.Popen, str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    return proc, f"http://127.0.0.1:{port}"


def bytes_read(scene: Path, size: int, overlap: int, task_windows: int, plain_grid: bool = False) -> dict[str, object]:
    import boto3
    import rasterio
    import s3fs

    from segbatch.geo.read import S3_BLOCK, open_scene, read_window
    from segbatch.geo.windows import grid
    from segbatch.spec import SceneSettings

    proc, endpoint = _moto()
    os.environ.update({"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_ENDPOINT_URL": endpoint})
    try:
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
        boto3.client("s3", endpoint_url=endpoint).upload_file(str(scene), "bench", "scene.tif")
        with rasterio.open(scene) as ds:
            bh, bw = ds.block_shapes[0]
            # the grid the job plans (block-aligned for a tiled file), or the plain one for comparison
            wins = grid(ds.width, ds.height, size, overlap, None if plain_grid else (bh, bw))
            needed = blocks = 0
            for w in wins:
                for r in range(w.row_off // bh, (w.row_off + w.height - 1) // bh + 1):
                    for c in range(w.col_off // bw, (w.col_off + w.width - 1) // bw + 1):
                        needed += ds.block_size(1, r, c)
                        blocks += 1
        figures: dict[str, object] = {"grid": "plain" if plain_grid else "aligned", "windows": len(wins),
                                      "window_side": max(w.width for w in wins), "blocks_read": blocks,
                                      "blocks_per_window": round(blocks / len(wins), 2),
                                      "scene_mb": round(scene.stat().st_size / 1e6, 1),
                                      "needed_mb": round(needed / 1e6, 1), "windows_per_task": task_windows}
        configs = [(f"blockcache_{b // 1024}k", {"default_block_size": b, "default_cache_type": "blockcache"}) for b in (256 * 1024, 1024 * 1024, S3_BLOCK)]
        configs.append(("s3fs_default_readahead_50m", {"default_block_size": 50 * 2**20, "default_cache_type": "readahead"}))
        for name, options in configs:
            # one open per load task of `task_windows` windows (grid order), as the load stage groups them
            s3fs.S3FileSystem.clear_instance_cache()
            start = time.perf_counter()
            with counting_s3_fetches() as fetched:
                for i in range(0, len(wins), task_windows):
                    with open_scene("s3://bench/scene.tif", options) as ds:
                        for w in wins[i : i + task_windows]:
                            read_window(ds, w, SceneSettings())
            figures[f"{name}_fetched_mb"] = round(sum(fetched) / 1e6, 1)
            figures[f"{name}_requests"] = len(fetched)
            figures[f"{name}_seconds"] = round(time.perf_counter() - start, 2)
        figures["s3_block_bytes"] = S3_BLOCK
        return figures
    finally:
        proc.terminate()
        for k in ("AWS_ENDPOINT_URL",):
            os.environ.pop(k, None)


def end_to_end(scene: Path, work: Path, arch: str, batch_size: int, size: int, overlap: int) -> dict[str, float]:
    out = work / f"out-{scene.parent.name}-{time.strftime('%H%M%S')}"
    job = {
        "name": "scene-throughput", "input": {"uri": str(scene.parent)},
        "model": {"task": "semantic", "arch": arch, "weights": "none", "num_classes": 4, "batch_size": batch_size},
        "output": {"uri": str(out)}, "compute": {"actors": 1, "cpus_per_actor": 1, "cpus_per_loader": 0.5},
        "tiling": {"size": size, "overlap": overlap},
    }
    path = work / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    subprocess.run([str(BIN / "segbatch"), "run", str(path)], check=True, capture_output=True)
    manifest = json.loads(next((out / "runs").glob("*.json")).read_text())
    t = manifest["timing"]
    n = manifest["counts"]["ok"]
    span = t["last_result_seconds"] - t["first_result_seconds"]
    return {"e2e_windows_per_s": round(n / t["stream_seconds"], 2), "steady_windows_per_s": t["steady_images_per_second"],
            "first_to_last_windows_per_s": round(n / span, 2) if span > 0 else 0.0, "wall_s": t["wall_seconds"],
            "windows": n, "first_to_last_s": round(span, 2)}


def model_only(scene: Path, arch: str, batch_size: int, size: int, overlap: int) -> float:
    import os as _os

    from pipeline_efficiency import _predictor, model_only_pair

    from segbatch.geo.read import open_scene, read_window
    from segbatch.geo.windows import grid
    from segbatch.spec import SceneSettings

    with open_scene(str(scene), {}) as ds:
        wins = grid(ds.width, ds.height, size, overlap, ds.block_shapes[0])  # the job's grid
        side = max(w.width for w in wins)
        full = [w for w in wins if (w.width, w.height) == (side, side)]
        images = [read_window(ds, w, SceneSettings())[0] for w in full]
    cores = _os.cpu_count() or 1
    pred = _predictor("semantic", arch, batch_size, cores)
    one, streams = model_only_pair(pred, images, batch_size, cores)
    return max(one, streams)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=4096)
    parser.add_argument("--arch", default="segbatch.models.small:unet_small")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--overlap", type=int, default=64)
    parser.add_argument("--task-windows", type=int, default=16, help="windows per load task (compute.load_batch_size)")
    parser.add_argument("--plain-grid", action="store_true", help="bytes: the plain grid, not aligned to the file's blocks")
    parser.add_argument("--skip-bytes", action="store_true")
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--double", action="store_true", help="also run a scene of sqrt(2) x the side (about 2x the windows): "
                        "the extra windows over the extra seconds, start-up cancelled (pipeline_efficiency.py's N vs 2N)")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="segbatch-scene-tp-"))
    scene = work / "scene" / "scene.tif"
    scene.parent.mkdir(parents=True, exist_ok=True)
    if not scene.exists():
        write_big_scene(scene, args.side)
    row: dict[str, object] = {"side": args.side, "tiling": [args.size, args.overlap], "arch": args.arch}
    if not args.skip_bytes:
        row.update(bytes_read(scene, args.size, args.overlap, args.task_windows, args.plain_grid))
    if not args.skip_e2e:
        before = model_only(scene, args.arch, args.batch_size, args.size, args.overlap)
        row.update(end_to_end(scene, work, args.arch, args.batch_size, args.size, args.overlap))
        if args.double:
            side2 = round(args.side * 2**0.5)
            big = work / f"scene-{side2}" / "scene.tif"
            if not big.exists():
                big.parent.mkdir(parents=True, exist_ok=True)
                write_big_scene(big, side2)
            second = end_to_end(big, work, args.arch, args.batch_size, args.size, args.overlap)
            extra_s = second["first_to_last_s"] - float(row["first_to_last_s"])  # type: ignore[arg-type]
            row.update({"double_side": side2, "double_windows": second["windows"], "double_first_to_last_s": second["first_to_last_s"],
                        "marginal_windows_per_s": round((second["windows"] - float(row["windows"])) / extra_s, 2) if extra_s > 0 else 0.0})  # type: ignore[arg-type]
        after = model_only(scene, args.arch, args.batch_size, args.size, args.overlap)
        row["model_only_windows_per_s"] = round((before + after) / 2, 2)
        row["model_only_drift"] = round(after / before, 3)
        if args.double:
            row["efficiency_marginal"] = round(float(row["marginal_windows_per_s"]) / row["model_only_windows_per_s"], 3)  # type: ignore[arg-type]
        row["efficiency_whole_stream"] = round(float(row["e2e_windows_per_s"]) / row["model_only_windows_per_s"], 3)  # type: ignore[arg-type]
        row["efficiency_first_to_last"] = round(float(row["first_to_last_windows_per_s"]) / row["model_only_windows_per_s"], 3)  # type: ignore[arg-type]
    print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
