"""Peak memory of a scene job: every segbatch process together, beyond Ray's own idle baseline.

Writes a side x side RGB scene (tiled 512, DEFLATE; a pattern of shapes on noise, written a strip at a
time so the writer itself stays small), runs `segbatch run` on it with tiling 512/64, and samples the
summed RSS of the run's process tree (driver, Ray's processes, workers). Ray's idle baseline is the
same sampling around a Ray that only starts and sleeps. Prints one JSON line per scene side.

Figures by role (driver; Ray workers running segbatch, `ray::…`; Ray's own processes), as RSS and PSS
(PSS shares the pages of libraries such as torch's among the workers that map them, which RSS counts
once per worker). `at_segbatch_pss_peak_mb`: what made up the peak of the driver and the Ray workers
together (the driver, and each worker kind as `<kind> x<count>`, by the name Ray gives the process:
`MapBatches(load_windows)`, `MapWorker(MapBatches(PredictStage))`, Ray Data's own actors, `IDLE`);
`most_alive_at_once`: the most processes of each kind seen at one sample; `actor_pss_by_tenth_mb`: the
predict actor's peak PSS in each tenth of its life (whether it grows with the windows done).

The model is a cheap fixed convolution (`tests.probe_models:color_probe`, run with the repository root
on PYTHONPATH) by default: the figure is about the pipeline (windows, parts, COG, polygons), not the model.

Usage: PYTHONPATH=. python benchmarks/scene_memory.py --sides 10000 20000
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
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PeakRss  # noqa: E402

BIN = Path(sys.executable).parent


def write_big_scene(path: Path, side: int, seed: int = 0) -> None:
    """A side x side x 3 uint8 GeoTIFF (EPSG:32633), written in 512-row strips: noise plus squares."""
    import rasterio
    from rasterio.transform import from_origin

    rng = np.random.default_rng(seed)
    profile = {
        "driver": "GTiff", "width": side, "height": side, "count": 3, "dtype": "uint8", "crs": "EPSG:32633",
        "transform": from_origin(500_000, 5_000_000, 1.0, 1.0), "tiled": True, "blockxsize": 512,
        "blockysize": 512, "compress": "deflate", "nodata": 0, "BIGTIFF": "IF_SAFER",
    }
    with rasterio.open(path, "w", **profile) as dst:
        for y in range(0, side, 512):
            h = min(512, side - y)
            strip = rng.integers(40, 91, size=(3, h, side), dtype=np.uint8)
            for x in range(0, side, 300):  # a square every 300 px, alternating classes, crossing seams
                k = (x // 300 + y // 512) % 3
                strip[:, :, x : x + 120] = 30
                strip[k, :, x : x + 120] = 210
            dst.write(strip, window=rasterio.windows.Window(0, y, side, h))


_RAY_CORE = ("raylet", "gcs_server", "dashboard", "log_monitor", "monitor.py", "runtime_env", "agent")


class PeakByRole(PeakRss):
    """Peaks of summed memory by role: the driver, the Ray workers running segbatch (`ray::...`), and
    Ray's own processes (raylet, GCS, agents). RSS and PSS (PSS splits shared pages, such as torch's
    libraries mapped by several workers, among the processes that map them)."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        super().__init__(pid, interval)
        self.peaks: dict[str, int] = {}
        self.at_peak: dict[str, int] = {}
        self.most: dict[str, int] = {}
        self.actor_series: list[int] = []

    def _sample(self) -> int:
        import psutil

        sums: dict[str, int] = {}
        kinds: dict[str, list[int]] = {}  # Ray worker kind (`ray::<name>`) → [count, PSS]
        for p in self._tree():
            try:
                cmd = " ".join(p.cmdline())[:200]
                info = p.memory_full_info()
            except psutil.Error:
                continue
            role = "driver" if p.pid == self.pid else "workers" if cmd.startswith("ray::") else (
                "ray_core" if any(k in cmd for k in _RAY_CORE) else "other")
            if role == "workers":
                k = kinds.setdefault(cmd[5:].split(" ")[0][:60], [0, 0])
                k[0] += 1
                k[1] += getattr(info, "pss", info.rss)
            for kind, value in (("rss", info.rss), ("pss", getattr(info, "pss", info.rss))):
                sums[f"{role}_{kind}"] = sums.get(f"{role}_{kind}", 0) + value
                sums[f"total_{kind}"] = sums.get(f"total_{kind}", 0) + value
            if role in ("driver", "workers"):
                for kind, value in (("rss", info.rss), ("pss", getattr(info, "pss", info.rss))):
                    sums[f"segbatch_{kind}"] = sums.get(f"segbatch_{kind}", 0) + value
        for k, v in sums.items():
            self.peaks[k] = max(self.peaks.get(k, 0), v)
        for name, (count, _) in kinds.items():  # the most processes of each kind alive at once
            self.most[name] = max(self.most.get(name, 0), count)
        actor = sum(v for name, (_, v) in kinds.items() if "PredictStage" in name)
        if actor:  # the predict actor over the run: does it grow with the windows it has done?
            self.actor_series.append(actor)
        if sums.get("segbatch_pss", 0) >= self.at_peak.get("segbatch_pss", 0):
            # what made up the segbatch peak: driver and each worker kind (count, PSS) at that moment
            self.at_peak = {"segbatch_pss": sums.get("segbatch_pss", 0), "driver_pss": sums.get("driver_pss", 0),
                            **{f"{name} x{c}": v for name, (c, v) in sorted(kinds.items())}}
        return sums.get("total_rss", 0)


def run_by_role(cmd: list[str]) -> tuple[dict[str, int], dict[str, int], dict[str, int], list[int]]:
    import os

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    with PeakByRole(proc.pid) as rss:
        _, err = proc.communicate(timeout=7200)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {err[-2000:]}")
    return rss.peaks, rss.at_peak, rss.most, rss.actor_series


def ray_baseline(seconds: float = 8.0) -> dict[str, int]:
    """Peak RSS of a local Ray that starts and idles (the run's Ray processes without any work)."""
    code = f"import ray, time; ray.init(address='local', include_dashboard=False); time.sleep({seconds}); ray.shutdown()"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with PeakByRole(proc.pid) as rss:
        proc.wait()
    return rss.peaks  # type: ignore[return-value]


def run_scene(work: Path, side: int, arch: str) -> dict[str, object]:
    scene_dir = work / f"scene-{side}"
    scene_dir.mkdir(parents=True, exist_ok=True)
    scene = scene_dir / "scene.tif"
    if not scene.exists():
        write_big_scene(scene, side)
    out = work / f"out-{side}-{time.strftime('%H%M%S')}"
    job = {
        "name": f"scene-memory-{side}",
        "input": {"uri": str(scene_dir)},
        "model": {"task": "semantic", "arch": arch, "weights": "none", "num_classes": 4, "batch_size": 4},
        "output": {"uri": str(out)},
        "compute": {"actors": 1, "cpus_per_actor": 1, "cpus_per_loader": 0.5, "load_batch_size": 8},
        "tiling": {"size": 512, "overlap": 64},
    }
    path = work / f"job-{side}.yaml"
    path.write_text(yaml.safe_dump(job))
    peaks, at_peak, most, actor = run_by_role([str(BIN / "segbatch"), "run", str(path)])
    manifest = json.loads(next((out / "runs").glob("*.json")).read_text())
    import pyarrow.parquet as pq

    scene_row = pq.read_table(out / "scenes").to_pylist()[0]
    return {
        "side": side,
        "pixels_gb": round(side * side * 3 / 1e9, 2),
        "windows": manifest["counts"]["ok"],
        "scene_status": scene_row["status"],
        "polygons": scene_row["polygons"],
        **{f"peak_{k}_mb": round(v / 2**20, 1) for k, v in sorted(peaks.items())},
        "wall_s": manifest["timing"]["wall_seconds"],
        "stream_s": manifest["timing"]["stream_seconds"],
        "assemble_s": scene_row["assemble_seconds"],
        "cog_mb": round((out / "masks" / "scene.tif.tif").stat().st_size / 2**20, 1),
        "at_segbatch_pss_peak_mb": {k: round(v / 2**20, 1) for k, v in at_peak.items()},
        "most_alive_at_once": most,
        # the predict actor's PSS, the peak of each tenth of its life
        "actor_pss_by_tenth_mb": [round(max(actor[i * len(actor) // 10 : (i + 1) * len(actor) // 10] or [0]) / 2**20) for i in range(10)],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sides", type=int, nargs="+", default=[20000])
    parser.add_argument("--arch", default="tests.probe_models:color_probe")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="segbatch-scene-mem-"))
    baseline = ray_baseline()
    print(json.dumps({"ray_idle_baseline": {f"{k}_mb": round(v / 2**20, 1) for k, v in sorted(baseline.items())}}), flush=True)
    for side in args.sides:
        row = run_scene(work, side, args.arch)
        for kind in ("rss", "pss"):
            row[f"beyond_idle_{kind}_mb"] = round(row[f"peak_total_{kind}_mb"] - baseline.get(f"total_{kind}", 0) / 2**20, 1)  # type: ignore[operator]
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
