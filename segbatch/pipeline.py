"""JobSpec → Ray Data stream → committed outputs. The only module that builds Ray Data plans.

A run goes through four phases, each a function below, handing on one :class:`JobRun`:

    prepare  (driver)  weights digest, ledger, plan pages (no torch)
    stream   (cluster) model proved in a worker; read plan → load → predict → write → commit  load, models, sinks
    after    (driver)  steps that need every item committed (`after_stream`: e.g. finish a scene)
    finish   (driver)  counts, timings, run manifest
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np

from segbatch import __version__
from segbatch.errors import JobError
from segbatch.layout import ActorLayout, decide_layout
from segbatch.load import load_batch
from segbatch.models.source import WeightsBytes
from segbatch.outputs import manifest_uri
from segbatch.progress import Progress
from segbatch.preflight import check_storage
from segbatch.plan import Plan, listing_errors, read_job_ledgers, read_plan_block, write_plan
from segbatch.result import RunResult, result_dict
from segbatch.rows import split_rows
from segbatch.retry import call_with_retries
from segbatch.sinks import Committer, new_run_id, rows_to_table, write_batch, write_layer_batch
from segbatch.spec import JobSpec
from segbatch.storage import filesystem, write_bytes_atomic

if TYPE_CHECKING:
    from segbatch.models.source import ResolvedWeights

__all__ = ["AfterStream", "JobRun", "LayerRun", "RunResult", "build_dataset", "load_block_rows", "result_dict", "run_job"]

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class LayerRun:
    """One model of a run: the single-model job it equals (:meth:`JobSpec.layer_jobs`: a layer's output is
    `output.uri/<name>/`), its weights, fingerprint and committer. A one-model job has one, named ""."""

    name: str
    spec: JobSpec
    read: WeightsBytes  # the weights' bytes and digest (torch-free)
    fingerprint: str
    committer: Committer
    weights: ResolvedWeights | None = None  # built and verified; None when there is nothing to process
    todo: int = 0  # items this model runs on in this run


@dataclass(slots=True)
class JobRun:
    """One run in progress: what each phase hands the next, and what an after-stream step may read."""

    spec: JobSpec
    run_id: str
    started: float
    result: RunResult
    plan: Plan
    layers: list[LayerRun]
    layout: ActorLayout | None = None

    # A one-model job's model, for steps that have one (scenes).
    @property
    def read(self) -> WeightsBytes:
        return self.layers[0].read

    @property
    def weights(self) -> ResolvedWeights | None:
        return self.layers[0].weights

    @property
    def fingerprint(self) -> str:
        return self.layers[0].fingerprint

    @property
    def committer(self) -> Committer:
        return self.layers[0].committer


#: A step run on the driver after the stream, once every planned item is committed (or failed).
AfterStream = Callable[[JobRun], None]


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
    # A new local Ray turns on token auth (its default, which we keep) and warns about it on every run;
    # the warning asks nothing of a segbatch user, so its logger shows errors only.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True, **kwargs)
    _quiet_ray_data()
    return address == "local"


def _quiet_ray_data() -> None:
    """segbatch shows its own progress (:mod:`segbatch.progress`: images against the planned total).

    Ray Data's counts blocks per operator without knowing the total (`Total Progress: 0/?` every
    10 s in a log), and announces each execution plan at INFO; its warnings still show.
    """
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # Turning the bars off makes Ray Data warn that they are off, once per process.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


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
    """Installed versions, from package metadata: a run with nothing to do never imports torch or Ray."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return {
        "segbatch": __version__,
        **{name: installed(name) for name in ("torch", "torchvision", "ray", "pyarrow")},
        "python": platform.python_version(),
    }


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


def _plan_dataset(spec: JobSpec, plan: Plan, block_rows: int) -> Any:
    """The plan pages as a Ray dataset of blocks of `block_rows` rows, one read task each.

    A custom datasource rather than `read_parquet`: Ray reads a Parquet file as one block, and an
    actor's streams need many small blocks (see :func:`load_block_rows`). Reads go through fsspec with
    the output's storage_options, like every other read and write.
    """
    import functools

    import ray
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    options = spec.output.storage_options

    class PlanSource(Datasource):
        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_read_tasks(self, parallelism: int, **_: Any) -> list[ReadTask]:
            return [
                ReadTask(
                    functools.partial(read_plan_block, part, options, start, stop),
                    BlockMetadata(num_rows=stop - start, size_bytes=None, exec_stats=None, input_files=None),
                    schema=plan.schema,
                )
                for part, start, stop in plan.blocks(block_rows)
            ]

    return ray.data.read_datasource(PlanSource(), override_num_blocks=len(plan.blocks(block_rows)))


def build_dataset(spec: JobSpec, plan: Plan, layers: Sequence[LayerRun], layout: ActorLayout) -> Any:
    """The Ray Data plan: plan pages → load (tasks) → predict (actor pool) → write (tasks).

    A several-model job has one actor pool holding every layer's model (:class:`LayerPredictor`) and one
    write stage that puts each row under its layer's output.
    """
    import ray

    from segbatch.models.remote import PredictStage  # the predictor (torch) is imported in the actor

    c, m = spec.compute, spec.first_model
    todo = plan.counts.todo
    load_rows = load_block_rows(c.load_batch_size, todo, layout.streams, m.batch_size)
    ds = _plan_dataset(spec, plan, max(load_rows, math.ceil(todo / 20_000)))  # at most ~20k blocks
    load_fn: Callable[..., Any] = load_batch
    load_kwargs: dict[str, Any] = {"settings": spec.load_settings()}
    one = layers[0]
    predict_kwargs: dict[str, Any] = {
        "task": m.task, "weights": ray.put(one.weights), "settings": one.spec.predict_settings(), "layout": layout
    }
    write_fn: Callable[..., Any] = write_batch
    write_kwargs: dict[str, Any] = {"output": spec.output, "task": m.task}
    if spec.layered:  # PredictStage builds a LayerPredictor from `layers`
        predict_kwargs = {
            "layers": [
                (lr.name, lr.spec.first_model.task, ray.put(lr.weights), lr.spec.predict_settings()) for lr in layers
            ],
            "layout": layout,
        }
        write_fn = write_layer_batch
        write_kwargs = {
            "outputs": {lr.name: lr.spec.output for lr in layers},
            "tasks": {lr.name: lr.spec.first_model.task for lr in layers},
        }
    write_pool: dict[str, Any] = {}
    if spec.tiling is not None:  # scenes: windows read by ranges, cores written as parts
        from segbatch.geo.read import load_windows
        from segbatch.geo.stitch import write_cores

        load_fn, load_kwargs = load_windows, {"settings": spec.scene_settings()}
        write_fn, write_kwargs = write_cores, {"output": spec.output, "settings": spec.scene_settings(), "task": m.task}
        # Each task worker process holds ~160 MB (Ray, pyarrow, rasterio) and stays while its stage is busy;
        # a window's core is one small PNG, so one write task per predict stream keeps up, where the 0.25-CPU
        # request alone lets four run per free core (benchmarks/README.md, "Scenes").
        streams = (c.actors if isinstance(c.actors, int) else c.actors[1]) * layout.streams
        write_pool = {"compute": ray.data.TaskPoolStrategy(size=streams)}
    ds = ds.map_batches(
        load_fn,
        batch_size=load_rows,
        num_cpus=c.cpus_per_loader,
        # A memory request (a real need: decoded batches) also keeps Ray Data from fusing decode into
        # the predict actors, which it does for task→actor maps with equal CPU/GPU requests.
        memory=c.memory_per_loader,
        fn_kwargs=load_kwargs,
    )
    pool = (
        {"size": c.actors} if isinstance(c.actors, int) else {"min_size": c.actors[0], "max_size": c.actors[1]}
    )
    ds = ds.map_batches(
        PredictStage,
        batch_size=m.batch_size,
        num_cpus=c.cpus_per_actor,
        num_gpus=c.gpus_per_actor,
        # Concurrent calls into one actor (one model in memory) are its streams; Ray Data runs them on
        # real threads only when asked to (torch releases the GIL in its kernels).
        compute=ray.data.ActorPoolStrategy(
            **pool, max_concurrent_calls_per_actor=layout.streams, enable_true_multi_threading=layout.streams > 1
        ),
        fn_constructor_kwargs=predict_kwargs,
    )
    return ds.map_batches(
        write_fn,
        batch_size=load_rows,  # bundles small predict blocks (batch_size 1 makes 1-row blocks): fewer tasks
        num_cpus=0.25,
        fn_kwargs=write_kwargs,
        **write_pool,
    )


def run_job(
    spec: JobSpec,
    force: bool = False,
    after_stream: Sequence[AfterStream] = (),
    progress: TextIO | None = None,
    *,
    preflight: bool = True,
) -> RunResult:
    """Run a job to completion: every listed item ends as exactly one committed row.

    Args:
        spec: The job.
        force: Redo everything; earlier parts move to `superseded/<run_id>/`.
        after_stream: Steps run on the driver once the stream is done and committed, before the manifest.
        progress: Where to show images done against the planned total while the job streams
            (:class:`segbatch.progress.Progress`: a bar on a terminal, a line every 10 s elsewhere).
        preflight: Check storage first (:func:`segbatch.preflight.check_storage`); False for a caller
            that just ran the checks.

    Raises:
        JobError: a job-level problem found before any work started (weights, storage, resources).
    """
    if preflight:
        check_storage(spec)
    run = _prepare(spec, force)
    if run.plan.counts.todo:
        _stream(run, progress)
    steps = list(after_stream)
    if spec.tiling is not None:  # scenes: assemble the COG and polygons of every scene now complete
        from segbatch.geo.scenes import finish_scenes

        steps.insert(0, finish_scenes)
    for step in steps:
        step(run)
    _finish(run)
    return run.result


def _prepare(spec: JobSpec, force: bool) -> JobRun:
    """The weights' digests, the ledgers, the plan written as pages (no torch: each model is proved in _stream).

    A several-model job does this per layer, on the single-model job each layer equals; its plan holds an
    item while any layer lacks it, with a bit mask of those layers (:class:`LayerLedgers`).
    """
    started = time.time()
    run_id = new_run_id()
    result = RunResult(run_id=run_id, output_uri=spec.output.uri, manifest_uri=manifest_uri(spec.output.uri, run_id))
    result.max_error_fraction = spec.run.max_error_fraction
    ledger, models = read_job_ledgers(spec, force=force, run_id=run_id)  # digests only: no torch yet
    layers = [
        LayerRun(m.name, m.job, m.read, m.fingerprint, Committer(m.job.output, run_id, _file_metadata(m.job, None)))
        for m in models
    ]
    result.weights_sha256 = "" if spec.layered else layers[0].read.sha256
    o = spec.output
    with listing_errors(spec.input.uri):
        plan = write_plan(spec.input, ledger, o.uri, o.storage_options, run_id, tiling=spec.tiling)
    del ledger, models
    c = plan.counts
    if c.listed == 0:
        raise JobError(
            f"input.uri '{spec.input.uri}': no images found (looked for files ending in "
            f"{', '.join('.' + e for e in spec.input.extensions)}); check the path, or set input.extensions"
        )
    result.listed, result.skipped, result.new, result.changed = c.listed, c.skipped, c.new, c.changed
    result.unfinished = c.unfinished
    result.excluded = c.excluded
    if c.excluded:
        logger.warning("left out %d objects under output.uri '%s': it lies inside input.uri", c.excluded, o.uri)
    logger.info("planned %d items (%d listed, %d already done)", c.todo, c.listed, c.skipped)
    for k, layer in enumerate(layers):
        layer.todo = c.layer_todo[k] if spec.layered and c.layer_todo else c.todo
    return JobRun(spec, run_id, started, result, plan, layers)


def _file_metadata(spec: JobSpec, weights: ResolvedWeights | None) -> dict[str, str]:
    m = spec.first_model
    classes = weights.classes if weights is not None else m.classes
    return {"segbatch.classes": json.dumps(list(classes) if classes else None), "segbatch.task": m.task}


def _stream(run: JobRun, progress: TextIO | None) -> None:
    """Start (or join) Ray, prove each model's weights fit it in a worker (the driver never imports torch:
    :mod:`segbatch.models.remote`), decide the actor layout, stream the plan through the stages and commit;
    results done / planned are shown on `progress` (nowhere when None)."""
    from segbatch.models.remote import resolve_on_cluster

    spec, result = run.spec, run.result
    committers = {layer.name: layer.committer for layer in run.layers}
    stream_start = time.time()
    started_ray = _ensure_ray(spec)
    try:
        _check_resources(spec, started_ray)
        constants: dict[str, dict[str, str]] = {}
        resolved = resolve_on_cluster([(layer.spec.first_model, layer.read) for layer in run.layers])
        for layer, weights in zip(run.layers, resolved):
            layer.weights = weights
            layer.committer.file_metadata.update(_file_metadata(layer.spec, weights))
            constants[layer.name] = {
                "task": layer.spec.first_model.task,
                "model": weights.arch,
                "weights_sha256": weights.sha256,
                "fingerprint": layer.fingerprint,
                "run_id": run.run_id,
            }
        run.layout = decide_layout(spec.compute, _one_node_cpus())
        logger.info("predict actors: %s, %s each", spec.compute.actors, run.layout.describe())
        ds = build_dataset(spec, run.plan, run.layers, run.layout)
        arrivals: list[tuple[float, int]] = []  # (time, rows so far): for the steady-state rate
        total = sum(layer.todo for layer in run.layers)
        unit = "results" if spec.layered else "images"
        with Progress(total, stream=progress, quiet=progress is None, unit=unit) as bar:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                rows = len(batch["item_id"])
                arrivals.append((time.time(), (arrivals[-1][1] if arrivals else 0) + rows))
                for name, part in _by_layer(batch):
                    committers[name].add(rows_to_table(part, constants[name]))
                bar.update(rows, errors=int(np.sum(batch["status"] != "ok")))
                if "retries" in batch:
                    result.retried += int(np.sum(batch["retries"]))
        result.steady_images_per_second = _steady_rate(arrivals)
        if arrivals:
            result.first_result_seconds = arrivals[0][0] - stream_start
            result.last_result_seconds = arrivals[-1][0] - stream_start
    finally:
        for layer in run.layers:
            layer.committer.flush()  # also on failure: rows already finished are committed, not lost
            result.retried += layer.committer.retries.count
        if started_ray:
            import ray

            ray.shutdown()
        result.stream_seconds = time.time() - stream_start


def _by_layer(batch: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """A finished batch's rows per layer (one-model jobs: all of them, under "")."""
    return split_rows(batch, "layer") if "layer" in batch else [("", batch)]


def _finish(run: JobRun) -> None:
    """Counts, rates and the run manifest (a several-model job: one per layer in its own output, and one
    for the job listing the layers)."""
    result = run.result
    totals: Counter[str] = Counter()
    for layer in run.layers:
        counts = Counter(layer.committer.committed_counts)  # rows in the ledger, not rows the driver saw
        totals.update(counts)
        if run.spec.layered:
            ok = counts.pop("ok", 0)
            result.layers[layer.name] = {
                "output_uri": layer.spec.output.uri,
                "manifest_uri": manifest_uri(layer.spec.output.uri, run.run_id),
                "processed": ok + sum(counts.values()),
                "ok": ok,
                "errors": dict(sorted(counts.items())),
            }
    result.processed = sum(totals.values())
    result.ok = totals.pop("ok", 0)
    result.errors = dict(sorted(totals.items()))
    result.wall_seconds = time.time() - run.started
    result.images_per_second = result.processed / result.stream_seconds if result.stream_seconds > 0 else 0.0
    result.error_fraction = result.error_count / result.processed if result.processed else 0.0
    if run.spec.layered:
        for layer in run.layers:
            _write_manifest(run, layer)
    _write_manifest(run, None if run.spec.layered else run.layers[0])


def _write_manifest(run: JobRun, layer: LayerRun | None) -> None:
    """`runs/<run_id>.json` of a model's output (`layer`), or of a several-model job's top folder (None)."""
    spec, result = run.spec, run.result
    counts: dict[str, Any] = {
        "listed": result.listed,
        "skipped": result.skipped,
        "new": result.new,
        "changed": result.changed,
        **({"unfinished": result.unfinished} if spec.layered else {}),
        "excluded": result.excluded,
        "processed": result.processed,
        "retried": result.retried,
        "ok": result.ok,
        "error": result.errors,
    }
    manifest: dict[str, Any] = {"run_id": result.run_id, "job": spec.redacted(), "versions": _versions()}
    if layer is not None:
        weights, m = layer.weights, layer.spec.first_model
        # With nothing to process the model was never built: arch and classes are what the job says.
        classes = weights.classes if weights is not None else m.classes
        if spec.layered:  # this layer's own rows: the job's counts are in the top folder's manifest
            mine = result.layers[layer.name]
            counts.update(
                skipped=result.listed - layer.todo, processed=mine["processed"], ok=mine["ok"], error=mine["errors"]
            )
            manifest["layer"] = layer.name
        manifest |= {
            "weights": {
                "kind": layer.read.kind,
                "source": layer.read.source,
                "sha256": layer.read.sha256,
                "arch": weights.arch if weights is not None else m.arch,
                "num_classes": weights.num_classes if weights is not None else m.num_classes,
                "classes": list(classes) if classes else None,
            },
            "fingerprint": layer.fingerprint,
            "metadata_parts": layer.committer.parts,
        }
    else:
        manifest["layers"] = result.layers
    manifest |= {
        "counts": counts,
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
        "plan_parts": run.plan.parts,
    }
    where = manifest_uri(layer.spec.output.uri, run.run_id) if layer is not None else result.manifest_uri
    fs, path = filesystem(where, spec.output.storage_options)
    data = json.dumps(manifest, indent=2).encode()
    call_with_retries(lambda: write_bytes_atomic(fs, path, data), what=f"writing {where}")
