"""JobSpec → Ray Data stream → committed outputs. The only module that builds Ray Data plans.

    plan (driver)   list input, stable item ids, minus items already committed
    load  (tasks)   fetch + decode          segbatch.load.load_batch (Loader)
    predict (actors) model, once per actor  segbatch.models.Predictor
    write (tasks)   mask artifacts          segbatch.sinks.write_batch (MaskWriter)
    commit (driver) Parquet ledger parts    segbatch.sinks.Committer
    finalize        run manifest + summary
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow.compute as pc

from segbatch import __version__
from segbatch.errors import JobError
from segbatch.load import load_batch
from segbatch.models import Predictor, ResolvedWeights, resolve_weights
from segbatch.models.threads import MAX_STREAMS
from segbatch.plan import WorkItem, plan_items
from segbatch.preflight import check_storage
from segbatch.retry import call_with_retries
from segbatch.sinks import Committer, manifest_uri, new_run_id, read_committed, rows_to_table, write_batch
from segbatch.spec import ComputeSpec, JobSpec
from segbatch.storage import UnsafeKeyError, filesystem, safe_relative_key, write_bytes_atomic

__all__ = ["RunResult", "run_job", "item_rows"]

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class RunResult:
    """What a run did; also the `counts`/`timing` part of the run manifest."""

    run_id: str
    output_uri: str
    manifest_uri: str
    listed: int = 0
    skipped: int = 0
    new: int = 0
    changed: int = 0
    processed: int = 0
    retried: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    wall_seconds: float = 0.0
    stream_seconds: float = 0.0
    images_per_second: float = 0.0
    steady_images_per_second: float = 0.0  # after the first quarter of results: startup excluded
    first_result_seconds: float = 0.0  # stream start to the first result rows (Ray, actors, model load, fill)
    last_result_seconds: float = 0.0  # stream start to the last result rows (before the final commit, shutdown)
    error_fraction: float = 0.0
    max_error_fraction: float = 0.0
    weights_sha256: str = ""

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def failed_budget(self) -> bool:
        return self.error_fraction > self.max_error_fraction


def item_rows(items: list[WorkItem]) -> list[dict[str, Any]]:
    """Work items → input rows for Ray Data, with the output key checked for safety here."""
    rows = []
    for it in items:
        try:
            rel_key, plan_error = safe_relative_key(it.uri, it.base), ""
        except UnsafeKeyError as e:
            rel_key, plan_error = "", f"{it.uri}: {e}"
        rows.append(
            {
                "item_id": it.item_id,
                "uri": it.uri,
                "version": it.version,
                "size": it.size,
                "rel_key": rel_key,
                "plan_error": plan_error,
            }
        )
    return rows


def _ensure_ray(spec: JobSpec) -> bool:
    """Connect to the cluster in RAY_ADDRESS (or the `ray job submit` one), else start a local Ray.

    Returns True when this call started Ray (and so should shut it down).
    """
    import ray

    if ray.is_initialized():
        return False
    # "local" unless told otherwise: never attach by accident to some other Ray running on this machine.
    address = os.environ.get("RAY_ADDRESS") or "local"
    kwargs: dict[str, Any] = {"include_dashboard": False} if address == "local" else {}
    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True, **kwargs)
    return address == "local"


def _check_resources(spec: JobSpec, started_locally: bool) -> None:
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    need = spec.compute.gpus_per_actor
    if need > 0 and gpus == 0:
        msg = (
            f"compute.gpus_per_actor is {need} but the Ray cluster has no GPUs; "
            "set compute.gpus_per_actor: 0 to run on CPUs"
        )
        if started_locally:
            raise JobError(msg)
        logger.warning("%s (waiting for the autoscaler to add GPU nodes)", msg)


def _steady_rate(arrivals: list[tuple[float, int]], skip_fraction: float = 0.25) -> float:
    """Images/s once the pipeline is full: from the batch that completes the first `skip_fraction` of
    the rows to the last one, so Ray start-up, actor start and model load do not count."""
    if len(arrivals) < 2:
        return 0.0
    total = arrivals[-1][1]
    start_t, start_rows = next((t, n) for t, n in arrivals if n >= skip_fraction * total)
    if start_t >= arrivals[-1][0]:
        start_t, start_rows = arrivals[0]
    elapsed = arrivals[-1][0] - start_t
    return (total - start_rows) / elapsed if elapsed > 0 else 0.0


def _versions() -> dict[str, str]:
    import pyarrow
    import ray
    import torch
    import torchvision

    return {
        "segbatch": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "ray": ray.__version__,
        "pyarrow": pyarrow.__version__,
        "python": platform.python_version(),
    }


@dataclass(slots=True)
class Ledger:
    """What an output prefix already holds: committed item ids and the URIs they came from."""

    done: set[str]
    uris: set[str]


def _read_ledger(spec: JobSpec, fingerprint: str, force: bool, run_id: str) -> Ledger:
    """Committed items under the output, refusing results from a different model setup.

    With `force`, earlier parts are moved aside to `superseded/<run_id>/` (never deleted) and
    everything is redone.
    """
    committed = read_committed(
        spec.output.uri, spec.output.storage_options, columns=["item_id", "uri", "fingerprint"]
    )
    if not committed.num_rows:
        return Ledger(set(), set())
    if force:
        _supersede(spec, run_id)
        return Ledger(set(), set())
    others = set(pc.unique(committed["fingerprint"]).to_pylist()) - {fingerprint}
    if others:
        raise JobError(
            f"output.uri '{spec.output.uri}' already holds results made with another model, weights or "
            f"preprocessing (fingerprint {sorted(others)[0]}, this job's is {fingerprint}); "
            "write to a new output.uri, or pass --force to redo everything (earlier results are kept "
            "under superseded/)"
        )
    return Ledger(set(committed["item_id"].to_pylist()), set(committed["uri"].to_pylist()))


def _supersede(spec: JobSpec, run_id: str) -> None:
    fs, root = filesystem(spec.output.uri, spec.output.storage_options)
    root = root.rstrip("/")
    for folder in ("metadata", "errors"):
        try:
            parts = [p for p in fs.find(f"{root}/{folder}") if p.endswith(".parquet")]
        except FileNotFoundError:
            continue
        target = f"{root}/superseded/{run_id}/{folder}"
        fs.makedirs(target, exist_ok=True)
        for part in parts:
            fs.mv(part, f"{target}/{part.rsplit('/', 1)[1]}")
    logger.warning("--force: earlier results moved to %s/superseded/%s/", spec.output.uri.rstrip("/"), run_id)


def _shares_one_node(compute: ComputeSpec, one_node_cpus: int | None) -> bool:
    """A CPU-only pool of fixed size on a one-node Ray, threads not fixed by hand: the actor lays out its own threads."""
    return bool(
        one_node_cpus and compute.gpus_per_actor == 0 and isinstance(compute.actors, int) and not compute.threads_per_actor
    )


def actor_threads(compute: ComputeSpec, one_node_cpus: int | None) -> tuple[int, int]:
    """Torch threads per predict actor: (to start with, the most it may move to).

    `threads_per_actor` when set, else `cpus_per_actor` rounded, both fixed. On a one-node Ray
    (`one_node_cpus` = its CPUs) a CPU-only pool of fixed size shares the node's cores instead: a
    1-CPU reservation must not leave a laptop's other cores idle. It starts with the cores but one,
    which leaves one to load and write, and may move to all of them once its first batches show that
    loading and writing are a small share of the model's time (:mod:`segbatch.models.threads`).
    """
    if compute.threads_per_actor:
        return compute.threads_per_actor, compute.threads_per_actor
    base = max(1, round(compute.cpus_per_actor))
    if _shares_one_node(compute, one_node_cpus):
        assert one_node_cpus and isinstance(compute.actors, int)
        start = max(base, (one_node_cpus - 1) // compute.actors)
        return start, max(start, one_node_cpus // compute.actors)
    return base, base


def actor_streams(compute: ComputeSpec, one_node_cpus: int | None) -> int:
    """Concurrent forward passes per predict actor (see :mod:`segbatch.models.threads`).

    `streams_per_actor` when set (at most one per torch thread); else one pass per thread (at most
    `MAX_STREAMS`) where the actor picks its own threads, one pass elsewhere (a GPU, or threads the
    user fixed).
    """
    if compute.streams_per_actor:
        return min(compute.streams_per_actor, actor_threads(compute, one_node_cpus)[1])
    if _shares_one_node(compute, one_node_cpus):
        return min(actor_threads(compute, one_node_cpus)[1], MAX_STREAMS)
    return 1


def load_block_rows(load_batch_size: int, items: int, streams: int, batch_size: int) -> int:
    """Images per load task, which is also per block the predict actor receives.

    An actor runs a block's batches one after another, so its streams overlap only across blocks: a
    job with fewer blocks than streams would run on one. With several streams, blocks shrink until
    each stream gets about four (never below one model batch), so the last blocks, which run with
    streams idle, are a small part of a job.
    """
    if streams <= 1:
        return load_batch_size
    return max(1, min(load_batch_size, max(batch_size, math.ceil(items / (4 * streams)))))


def _one_node_cpus() -> int | None:
    import ray

    alive = [n for n in ray.nodes() if n.get("Alive")]
    if len(alive) != 1:
        return None
    return int(alive[0]["Resources"].get("CPU", 0)) or None


def build_dataset(
    spec: JobSpec,
    rows: list[dict[str, Any]],
    weights: ResolvedWeights,
    threads: int = 1,
    most_threads: int | None = None,
    streams: int = 1,
) -> Any:
    """The Ray Data plan: from_items → load (tasks) → predict (actor pool) → write (tasks)."""
    import ray

    c, m = spec.compute, spec.model
    load_rows = load_block_rows(c.load_batch_size, len(rows), streams, m.batch_size)
    blocks = max(1, min(math.ceil(len(rows) / load_rows), 20_000))
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    ds = ds.map_batches(
        load_batch,
        batch_size=load_rows,
        num_cpus=c.cpus_per_loader,
        # A memory request (a real need: decoded batches) also keeps Ray Data from fusing decode into
        # the predict actors, which it does for task→actor maps with equal CPU/GPU requests.
        memory=c.memory_per_loader,
        fn_kwargs={
            "storage_options": spec.input.storage_options,
            "max_pixels": spec.input.max_pixels,
            "max_bytes": spec.input.max_bytes,
            "fetch_concurrency": c.fetch_concurrency,
            "jpeg_decode": c.jpeg_decode,
        },
    )
    pool = (
        {"size": c.actors} if isinstance(c.actors, int) else {"min_size": c.actors[0], "max_size": c.actors[1]}
    )
    ds = ds.map_batches(
        Predictor,
        batch_size=m.batch_size,
        num_cpus=c.cpus_per_actor,
        num_gpus=c.gpus_per_actor,
        # Concurrent calls into one actor (one model in memory) are its streams; Ray Data runs them on
        # real threads only when asked to (torch releases the GIL in its kernels).
        compute=ray.data.ActorPoolStrategy(
            **pool, max_concurrent_calls_per_actor=streams, enable_true_multi_threading=streams > 1
        ),
        fn_constructor_kwargs={
            "task": m.task,
            "weights": ray.put(weights),
            "options": {
                "batch_size": m.batch_size,
                "score_threshold": m.score_threshold,
                "mask_threshold": m.mask_threshold,
                "max_detections": m.max_detections,
                "precision": m.precision,
                "instance_png": spec.output.instance_png,
            },
            "num_threads": threads,
            "max_threads": most_threads,  # the actor's tuner does nothing when it is not above `threads`
            "max_streams": streams,
        },
    )
    ds = ds.map_batches(
        write_batch,
        batch_size=load_rows,  # bundles small predict blocks (batch_size 1 makes 1-row blocks): fewer tasks
        num_cpus=0.25,
        fn_kwargs={
            "output_uri": spec.output.uri,
            "storage_options": spec.output.storage_options,
            "write_png": m.task == "semantic" or spec.output.instance_png,
        },
    )
    return ds


def run_job(spec: JobSpec, force: bool = False, *, preflight: bool = True) -> RunResult:
    """Run a job to completion: every listed item ends as exactly one committed row.

    `preflight=False` skips the storage checks (segbatch.preflight) for a caller that just ran them.

    Raises:
        JobError: a job-level problem found before any work started (weights, storage, resources).
    """
    started = time.time()
    run_id = new_run_id()
    result = RunResult(run_id=run_id, output_uri=spec.output.uri, manifest_uri=manifest_uri(spec.output.uri, run_id))
    result.max_error_fraction = spec.run.max_error_fraction

    if preflight:  # input lists, output takes a write, weights exist: before the ledger read and Ray
        check_storage(spec)
    weights = resolve_weights(spec.model)
    result.weights_sha256 = weights.sha256
    fingerprint = spec.result_fingerprint(weights.sha256)
    ledger = _read_ledger(spec, fingerprint, force, run_id)
    try:
        items, result.listed, result.skipped = plan_items(spec.input, ledger.done)
        result.changed = sum(1 for it in items if it.uri in ledger.uris)
        result.new = len(items) - result.changed
    except JobError:
        raise
    except FileNotFoundError as e:
        raise JobError(f"input.uri '{spec.input.uri}': not found ({e})") from None
    except Exception as e:  # noqa: BLE001 - any failure to list is a job-level problem, reported in one line
        raise JobError(f"cannot list input.uri '{spec.input.uri}': {type(e).__name__}: {e}") from None
    logger.info("planned %d items (%d listed, %d already done)", len(items), result.listed, result.skipped)

    constants = {
        "task": spec.model.task,
        "model": weights.arch,
        "weights_sha256": weights.sha256,
        "fingerprint": fingerprint,
        "run_id": run_id,
    }
    file_metadata = {
        "segbatch.classes": json.dumps(list(weights.classes) if weights.classes else None),
        "segbatch.task": spec.model.task,
    }
    committer = Committer(
        spec.output.uri,
        spec.output.storage_options,
        run_id,
        file_metadata,
        commit_rows=spec.output.commit_rows,
        commit_seconds=spec.output.commit_seconds,
    )
    counts: Counter[str] = Counter()
    stream_start = time.time()
    if items:
        started_ray = _ensure_ray(spec)
        try:
            _check_resources(spec, started_ray)
            one_node = _one_node_cpus()
            threads, most = actor_threads(spec.compute, one_node)
            streams = actor_streams(spec.compute, one_node)
            more = f" (up to {most} if the model outweighs the loaders)" if most > threads else ""
            split = f", split into up to {streams} concurrent forward passes" if streams > 1 else ""
            logger.info("predict actors: %s, %d torch threads each%s%s", spec.compute.actors, threads, more, split)
            ds = build_dataset(spec, item_rows(items), weights, threads, most, streams)
            arrivals: list[tuple[float, int]] = []  # (time, rows so far): for the steady-state rate
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                arrivals.append((time.time(), (arrivals[-1][1] if arrivals else 0) + len(batch["item_id"])))
                table = rows_to_table(batch, constants)
                committer.add(table)
                for status, cls in zip(batch["status"], batch["error_class"]):
                    counts["ok" if status == "ok" else str(cls)] += 1
                if "retries" in batch:
                    result.retried += int(np.sum(batch["retries"]))
            result.steady_images_per_second = _steady_rate(arrivals)
            if arrivals:
                result.first_result_seconds = arrivals[0][0] - stream_start
                result.last_result_seconds = arrivals[-1][0] - stream_start
        finally:
            committer.flush()  # also on failure: rows already finished are committed, not lost
            result.retried += committer.retries.count
            if started_ray:
                import ray

                ray.shutdown()
    result.stream_seconds = time.time() - stream_start
    result.processed = sum(counts.values())
    result.ok = counts.pop("ok", 0)
    result.errors = dict(sorted(counts.items()))
    result.wall_seconds = time.time() - started
    result.images_per_second = result.processed / result.stream_seconds if result.stream_seconds > 0 else 0.0
    result.error_fraction = result.error_count / result.processed if result.processed else 0.0
    _write_manifest(spec, result, weights, fingerprint, committer.parts)
    return result


def _write_manifest(
    spec: JobSpec, result: RunResult, weights: ResolvedWeights, fingerprint: str, parts: list[str]
) -> None:
    manifest = {
        "run_id": result.run_id,
        "job": spec.redacted(),
        "versions": _versions(),
        "weights": {
            "kind": weights.kind,
            "source": weights.source,
            "sha256": weights.sha256,
            "arch": weights.arch,
            "num_classes": weights.num_classes,
            "classes": list(weights.classes) if weights.classes else None,
        },
        "fingerprint": fingerprint,
        "counts": {
            "listed": result.listed,
            "skipped": result.skipped,
            "new": result.new,
            "changed": result.changed,
            "processed": result.processed,
            "retried": result.retried,
            "ok": result.ok,
            "error": result.errors,
        },
        "timing": {
            "wall_seconds": round(result.wall_seconds, 3),
            "stream_seconds": round(result.stream_seconds, 3),
            "images_per_second": round(result.images_per_second, 3),
            "steady_images_per_second": round(result.steady_images_per_second, 3),
            "first_result_seconds": round(result.first_result_seconds, 3),
            "last_result_seconds": round(result.last_result_seconds, 3),
        },
        "error_fraction": result.error_fraction,
        "max_error_fraction": result.max_error_fraction,
        "metadata_parts": parts,
    }
    fs, path = filesystem(result.manifest_uri, spec.output.storage_options)
    data = json.dumps(manifest, indent=2).encode()
    call_with_retries(lambda: write_bytes_atomic(fs, path, data), what=f"writing {result.manifest_uri}")


def result_dict(result: RunResult) -> dict[str, Any]:
    """The result as plain data (for `--json` output)."""
    return asdict(result)
