"""Shared helpers for the benchmark scripts: dataset generation, process-tree memory sampling."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

from segbatch.synth import make_scene


def make_jpegs(folder: Path, count: int, height: int, width: int, seed: int = 0) -> list[Path]:
    """`count` synthetic scenes as JPEGs (reused when already there with the same parameters)."""
    folder.mkdir(parents=True, exist_ok=True)
    stamp = folder / f".made-{count}-{height}x{width}-{seed}"
    paths = [folder / f"img-{i:05d}.jpg" for i in range(count)]
    if stamp.exists():
        return paths
    rng = np.random.default_rng(seed)
    for path in paths:
        Image.fromarray(make_scene(rng, height, width).image).save(path, quality=90)
    stamp.touch()
    return paths


class PeakRss:
    """Samples the summed RSS of a process and all its descendants (Ray workers included)."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid, self.interval, self.peak = pid, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _tree(self) -> list[psutil.Process]:
        """The process and all its descendants now (empty once it has ended)."""
        try:
            root = psutil.Process(self.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def _sample(self) -> int:
        total = 0
        for p in self._tree():
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            time.sleep(self.interval)

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_measured(cmd: list[str], cwd: Path | None = None, timeout: float = 3600) -> tuple[subprocess.CompletedProcess, int]:
    """Run a command (own session, output captured); return it and the peak RSS of its process tree."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    with PeakRss(proc.pid) as rss:
        out, err = proc.communicate(timeout=timeout)
    done = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {err[-2000:]}")
    return done, rss.peak
