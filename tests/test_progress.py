"""Progress while a job runs: a bar in a terminal, lines in a log, nothing with --quiet; Ray's noise gone."""

from __future__ import annotations

import io
import os
import pty
import select
import subprocess
import time
from pathlib import Path

import yaml

from segbatch.progress import Progress
from tests.test_cli import SEGBATCH, write_job
from tests.conftest import write_images


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bar_in_a_terminal_counts_rate_eta_and_errors() -> None:
    out = _Terminal()
    bar = Progress(10, stream=out, redraw_seconds=0.0)
    bar.update(2)
    time.sleep(0.2)
    bar.update(4, errors=1)
    bar.close()
    text = out.getvalue()
    assert text.count("\r") == 2 and text.endswith("\n")
    last = text.rsplit("\r", 1)[1]
    assert "6/10 images (60%)" in last and "1 error" in last and "images/s · ETA 0:0" in last
    assert last.startswith("\x1b[2K" + "█" * 14 + "░" * 10)  # 6/10 of a 24-cell bar


def test_lines_in_a_log_every_interval_and_at_the_end() -> None:
    out = io.StringIO()
    bar = Progress(4, stream=out, log_seconds=3600)
    bar.update(1)  # not due yet
    bar.update(3)  # the last image: always shown
    bar.close()
    assert out.getvalue().splitlines() == [out.getvalue().splitlines()[-1]]
    assert out.getvalue().startswith("segbatch: progress 4/4 images (100%)") and "\r" not in out.getvalue()


def test_quiet_writes_nothing() -> None:
    out = _Terminal()
    with Progress(3, stream=out, quiet=True, redraw_seconds=0.0) as bar:
        bar.update(3)
    assert out.getvalue() == ""


def _job(tmp_path: Path) -> Path:
    write_images(tmp_path / "in", [(40, 48)] * 5)
    return write_job(tmp_path)


def test_run_in_a_terminal_shows_a_bar_and_no_ray_noise(tmp_path: Path) -> None:
    job = _job(tmp_path)
    main, child = pty.openpty()
    proc = subprocess.Popen([SEGBATCH, "run", str(job)], stdin=child, stdout=child, stderr=child, cwd=tmp_path)
    os.close(child)
    chunks = []
    deadline = time.time() + 300
    while time.time() < deadline:
        ready, _, _ = select.select([main], [], [], 1.0)
        if ready:
            try:
                data = os.read(main, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    proc.wait(timeout=60)
    os.close(main)
    screen = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, screen[-3000:]
    assert "\r\x1b[2K" in screen and "█" in screen and "5/5 images (100%)" in screen
    assert "segbatch: progress" not in screen  # a terminal gets the bar, not log lines
    for noise in ("max_restarts", "Token authentication", "Total Progress", "tqdm is not installed", "Execution plan"):
        assert noise not in screen, noise
    assert "speed      start-up" in screen


def test_run_in_a_log_writes_progress_lines_and_quiet_none(tmp_path: Path) -> None:
    job = _job(tmp_path)
    logged = subprocess.run([SEGBATCH, "run", str(job)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert logged.returncode == 0, logged.stderr[-3000:]
    lines = [line for line in logged.stderr.splitlines() if line.startswith("segbatch: progress")]
    assert lines and lines[-1].startswith("segbatch: progress 5/5 images (100%)"), logged.stderr[-2000:]
    for noise in ("max_restarts", "Token authentication", "Total Progress", "Execution plan"):
        assert noise not in logged.stderr, noise

    data = yaml.safe_load(job.read_text())
    data["output"]["uri"] = str(tmp_path / "out2")
    job.write_text(yaml.safe_dump(data))
    quiet = subprocess.run([SEGBATCH, "run", str(job), "--quiet"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert "segbatch: progress" not in quiet.stderr and "ok 5" in quiet.stdout


def test_a_job_that_lists_no_images_fails_naming_the_uri(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    job = write_job(tmp_path)
    empty = subprocess.run([SEGBATCH, "run", str(job)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert empty.returncode == 1
    last = empty.stderr.strip().splitlines()[-1]
    assert last.startswith(f"segbatch: job failed: input.uri '{tmp_path / 'in'}': no images found (looked for files ending in .jpg, .jpeg, .png")
    assert "Traceback" not in empty.stderr
