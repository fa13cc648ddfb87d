"""Planning at scale: a Parquet manifest of N URIs, half of them already committed, planned as `segbatch run` plans.

Prints one JSON line:
  entries            manifest entries (N); committed: N/2 of them, in metadata parts of `--part-rows` rows
  plan_seconds       read the ledger (item_id, uri, fingerprint columns, part by part) + list the manifest in pages
                     + write the plan pages (`runs/<run_id>/plan/`): `outputs.read_ledger` then `plan.write_plan`
  ledger_seconds     the ledger part of it
  peak_rss_mb        peak RSS of the measuring process during planning
  baseline_rss_mb    its RSS after imports, before planning
  peak_above_baseline_mb
  listed, new, changed, skipped   the plan's counts (skipped = N/2)

The files named in the manifest need not exist: planning never opens them. Inputs are generated once per N
under --workdir and reused. The measurement runs in a fresh process, so the peak is planning's alone.

Usage: python benchmarks/plan_scale.py --entries 1000000 [--workdir /tmp/segbatch-plan-scale]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

FINGERPRINT = "bench0fingerprnt"


def _uris(start: int, stop: int) -> list[str]:
    return [f"s3://bench-bucket/images/{i // 1000:06d}/img-{i:09d}.jpg" for i in range(start, stop)]


def generate(work: Path, entries: int, part_rows: int) -> tuple[Path, Path]:
    """The manifest (uri, size) and an output whose metadata parts commit every other entry."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from segbatch.outputs import METADATA_SCHEMA
    from segbatch.plan import item_id_for

    folder = work / f"n{entries}"
    manifest, out = folder / "manifest.parquet", folder / "out"
    stamp = folder / ".made"
    if stamp.exists():
        return manifest, out
    (out / "metadata").mkdir(parents=True, exist_ok=True)
    chunk = 1_000_000
    with pq.ParquetWriter(manifest, pa.schema([("uri", pa.string()), ("size", pa.int64())])) as writer:
        for start in range(0, entries, chunk):
            stop = min(entries, start + chunk)
            writer.write_table(pa.table({"uri": _uris(start, stop), "size": pa.array(range(1000 + start, 1000 + stop))}))
    committed = range(0, entries, 2)
    for seq, first in enumerate(range(0, len(committed), part_rows)):
        idx = committed[first : first + part_rows]
        uris = [_uris(i, i + 1)[0] for i in idx]
        ids = [item_id_for(u, str(1000 + i)) for u, i in zip(uris, idx)]
        n = len(ids)
        columns = {f.name: pa.nulls(n, f.type) for f in METADATA_SCHEMA}
        columns.update(item_id=pa.array(ids), uri=pa.array(uris), fingerprint=pa.array([FINGERPRINT] * n),
                       status=pa.array(["ok"] * n))
        pq.write_table(pa.table(columns, schema=METADATA_SCHEMA), out / "metadata" / f"part-bench-{seq:05d}.parquet")
    stamp.touch()
    return manifest, out


def measure(manifest: Path, out: Path) -> dict[str, object]:
    """Plan as a run does, in this (fresh) process."""
    import pandas.util  # noqa: F401 - imported by the ledger's hashing; an import, not planning's memory

    from segbatch.outputs import read_ledger
    from segbatch.plan import write_plan
    from segbatch.spec import InputSpec

    def rss_mb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    baseline = rss_mb()
    start = time.perf_counter()
    ledger = read_ledger(str(out), None, FINGERPRINT)
    ledger_s = time.perf_counter() - start
    plan = write_plan(InputSpec(uri=str(manifest)), ledger, str(out), None, f"bench-{int(time.time())}")
    elapsed = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    shutil.rmtree(out / "runs", ignore_errors=True)  # the plan pages: each measurement writes its own
    c = plan.counts
    return {
        "plan_seconds": round(elapsed, 2),
        "ledger_seconds": round(ledger_s, 2),
        "peak_rss_mb": round(peak, 1),
        "baseline_rss_mb": round(baseline, 1),
        "peak_above_baseline_mb": round(peak - baseline, 1),
        "listed": c.listed,
        "new": c.new,
        "changed": c.changed,
        "skipped": c.skipped,
        "plan_parts": len(plan.parts),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--part-rows", type=int, default=100_000, help="rows per committed metadata part")
    parser.add_argument("--workdir", default="/tmp/segbatch-plan-scale")
    parser.add_argument("--measure", nargs=2, metavar=("MANIFEST", "OUTPUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(Path(args.measure[0]), Path(args.measure[1]))))
        return 0
    work = Path(args.workdir)
    t = time.perf_counter()
    manifest, out = generate(work, args.entries, args.part_rows)
    made = time.perf_counter() - t
    done = subprocess.run(
        [sys.executable, __file__, "--measure", str(manifest), str(out)], capture_output=True, text=True, check=True
    )
    figures = {"entries": args.entries, "committed": (args.entries + 1) // 2, "part_rows": args.part_rows,
               "cores": os.cpu_count(), **json.loads(done.stdout.strip().splitlines()[-1]),
               "generate_seconds": round(made, 1)}
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
