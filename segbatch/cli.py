"""`segbatch` command line: run | plan | validate | demo | submit | eval | export | report.

Exit codes: 0 the job finished (per-item errors within `run.max_error_fraction`); 1 the job failed
(a job-level error, or too many item errors: everything is still written); 2 a bad job file or
command line, reported before Ray starts.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from segbatch.errors import JobError
from segbatch.preflight import check_storage, describe_output_read_error, describe_storage_error, is_storage_error
from segbatch.spec import JobSpec, SpecError, add_override_argument, load_job
from segbatch.submit import add_submit_parser, cmd_submit

__all__ = ["main"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _add_job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", help="job YAML file")
    add_override_argument(p)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segbatch", description="Distributed batch image segmentation on Ray Data.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a job (local Ray, or the cluster in RAY_ADDRESS)")
    _add_job_args(run)
    run.add_argument("--quiet", action="store_true", help="no progress output while the job runs (the summary still prints)")
    run.add_argument(
        "--force",
        action="store_true",
        help="redo every item even if the output holds results (earlier parts move to superseded/)",
    )
    plan = sub.add_parser(
        "plan", help="list the input and read the output's ledger as `run` would (no Ray, no model): what a run would do"
    )
    _add_job_args(plan)
    val = sub.add_parser("validate", help="check a job file without running it")
    _add_job_args(val)
    val.add_argument(
        "--check-storage", action="store_true", help="also resolve the weights and list the input (touches storage)"
    )
    demo = sub.add_parser(
        "demo", help="generate fresh scenes with truth, run jobs/prelabel.yaml (a semantic and an instance layer), score, export and preview both"
    )
    demo.add_argument("--workdir", default=".", help="where demo-data/ and demo-output/ go (default: .)")
    demo.add_argument("--images", type=int, default=48, help="number of scenes to generate (default: 48)")
    demo.add_argument(
        "--seed", type=int, default=None, help="first scene seed (default: 10000000, the first seed after training's)"
    )
    demo.add_argument(
        "--scene", action="store_true",
        help="the satellite-scene demo instead: a georeferenced scene → jobs/satellite.yaml → label COG + GeoParquet "
        "(needs segbatch[geo])",
    )
    add_submit_parser(sub)
    ev = sub.add_parser("eval", help="score a job's outputs against ground truth (IoU / COCO AP)")
    ev.add_argument("output", help="the job's output.uri (reads its committed metadata and masks)")
    ev.add_argument(
        "--truth",
        required=True,
        help="ground truth: semantic, a folder with labels/<rel_key>.png; instance, a COCO instances JSON "
        "or a folder holding instances.json (segbatch.synth.write_dataset writes one folder for both)",
    )
    ev.add_argument("--layer", default=None, help="the layer of a several-model job's output to score (OUTPUT/<layer>/)")
    ex = sub.add_parser(
        "export", help="write a job's committed outputs for CVAT, Label Studio or COCO tools (no model is run)"
    )
    ex.add_argument("output", help="the job's output.uri (reads its committed metadata and masks)")
    ex.add_argument("--format", required=True, choices=["coco", "cvat", "labelstudio"], help="what to write")
    ex.add_argument("--dest", default=None, help="destination folder or URI (default: OUTPUT/exports/<format>/)")
    ex.add_argument("--min-score", type=float, default=0.0, help="leave out instances scoring below this (default: 0)")
    ex.add_argument("--polygons", action="store_true", help="polygons (outer contours) instead of masks")
    ex.add_argument("--layer", default=None, help="the layer of a several-model job's output to export (OUTPUT/<layer>/)")
    ex.add_argument("--task-size", type=int, default=1000, help="cvat: images per task (default: 1000)")
    ex.add_argument(
        "--local-files-root",
        default="/",
        help="labelstudio: LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT, for local images (default: /)",
    )
    rep = sub.add_parser("report", help="write OUTPUT/report/index.html: counts, scores, errors, overlays worst-first")
    rep.add_argument("output", help="the job's output.uri")
    rep.add_argument("--dest", default=None, help="destination folder or URI (default: OUTPUT/report/)")
    rep.add_argument("--min-score", type=float, default=0.0, help="leave out instances scoring below this (default: 0)")
    rep.add_argument("--gallery", type=int, default=200, help="overlays in the gallery, worst first (default: 200)")
    rep.add_argument("--layer", default=None, help="the layer of a several-model job's output (OUTPUT/<layer>/)")
    return parser


def _storage_error(output: str, e: Exception) -> JobError:
    return JobError(describe_output_read_error(e, output))


def _cmd_export(args: argparse.Namespace) -> int:
    import json

    from segbatch.export import export_output

    if args.task_size < 1:
        raise SpecError(f"--task-size expected a positive number, but got {args.task_size}")
    try:
        summary = export_output(
            args.output,
            args.format,
            dest=args.dest,
            min_score=args.min_score,
            polygons=args.polygons,
            layer=args.layer,
            task_size=args.task_size,
            local_files_root=args.local_files_root,
        )
    except (JobError, SpecError):
        raise
    except (ImportError, ValueError) as e:
        raise JobError(str(e)) from None
    except Exception as e:  # noqa: BLE001 - a storage problem is one line, exit 1
        raise _storage_error(args.output, e) from None
    errors = ", ".join(f"{k} {v}" for k, v in sorted(summary["errors"].items())) or "none"
    print(
        f"segbatch export: {summary['format']} of {summary['task']} outputs {args.output}: "
        f"{summary['images']} images, {summary['annotations']} objects; error rows left out: {errors}; "
        f"older commits left out: {summary['superseded']}; {summary['seconds']:.1f} s",
        flush=True,
    )
    for uri in summary["files"]:
        print(f"  {uri}", flush=True)
    print(json.dumps({k: v for k, v in summary.items() if k != "files"}), file=sys.stderr, flush=True)
    return EXIT_OK


def _cmd_report(args: argparse.Namespace) -> int:
    from segbatch.export.report import write_report_html

    if args.gallery < 0:
        raise SpecError(f"--gallery expected a number >= 0, but got {args.gallery}")
    try:
        summary = write_report_html(
            args.output, dest=args.dest, min_score=args.min_score, gallery=args.gallery, layer=args.layer
        )
    except (JobError, SpecError):
        raise
    except Exception as e:  # noqa: BLE001 - a storage problem is one line, exit 1
        raise _storage_error(args.output, e) from None
    print(
        f"segbatch report: {summary['images']} images, {summary['overlays']} overlays, "
        f"{summary['error_rows']} error rows: {summary['index']}",
        flush=True,
    )
    return EXIT_OK


def _cmd_run(args: argparse.Namespace) -> int:
    spec = load_job(args.job, args.overrides)
    check_storage(spec)  # before importing torch and Ray: a storage problem is reported in seconds
    from segbatch.console import dropping_stderr_lines
    from segbatch.pipeline import run_job
    from segbatch.result import format_summary

    try:
        with dropping_stderr_lines() as terminal:
            result = run_job(spec, force=args.force, progress=None if args.quiet else terminal, preflight=False)
    except (JobError, SpecError):
        raise
    except Exception as e:
        if not is_storage_error(e):
            raise
        # Storage failing after work started (a commit, the manifest): one line; committed parts stay.
        logging.getLogger(__name__).debug("storage failure during the run", exc_info=True)
        line = describe_storage_error(e, "output.uri", spec.output.uri, spec.output.storage_options, writing=True)
        raise JobError(f"{line} (parts committed before this stay; rerun the job to resume)") from None
    print(format_summary(result), flush=True)
    return EXIT_FAILED if result.failed_budget else EXIT_OK


def _cmd_plan(args: argparse.Namespace) -> int:
    """Weights are read for their digest (part of the fingerprint the ledger is checked against), never built: no torch."""
    spec = load_job(args.job, args.overrides)
    from segbatch.plan import count_plan, listing_errors, output_prefix, read_job_ledgers
    from segbatch.result import format_plan

    started = time.time()
    o = spec.output
    try:
        ledger, models = read_job_ledgers(spec)
    except (JobError, SpecError):
        raise
    except Exception as e:  # noqa: BLE001 - a storage problem is one line, exit 1
        raise JobError(describe_output_read_error(e, o.uri, o.storage_options)) from None
    with listing_errors(spec.input.uri):
        counts = count_plan(spec.input, ledger, tiling=spec.tiling, exclude_prefix=output_prefix(o.uri, o.storage_options))
    layers = [m.name for m in models] if spec.layered else None
    print(format_plan(args.job, spec.input.uri, o.uri, counts, time.time() - started, layers), flush=True)
    return EXIT_OK


def _describe_models(spec: JobSpec) -> str:
    if spec.layers is None:
        m = spec.first_model
        return f"{m.task}, {m.arch or m.weights}"
    return "layers " + ", ".join(f"{layer.name}: {layer.task} {layer.arch or layer.weights}" for layer in spec.layers)


def _cmd_validate(args: argparse.Namespace) -> int:
    spec = load_job(args.job, args.overrides)
    line = f"{args.job}: ok ({_describe_models(spec)}, output {spec.output.uri})"
    if args.check_storage:
        check_storage(spec)  # before importing torch: a storage problem is reported in seconds
        from segbatch.models.weights import resolve_weights
        from segbatch.plan import count_plan

        digests = []
        for _, job in spec.layer_jobs():
            assert job.model is not None
            digests.append(resolve_weights(job.model).sha256[:12])
        try:
            listed = count_plan(spec.input, tiling=spec.tiling).listed
        except Exception as e:  # noqa: BLE001 - as `run`: a listing failure is one line
            raise JobError(describe_storage_error(e, "input.uri", spec.input.uri, spec.input.storage_options)) from None
        line += f"; weights sha256 {', '.join(digests)}; {listed} images listed"
    print(line)
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from segbatch.console import dropping_stderr_lines
    from segbatch.demo import DEMO_SEED, run_demo

    seed = DEMO_SEED if args.seed is None else args.seed
    if not args.scene and args.images < 1:
        raise JobError(f"segbatch demo: --images expected a positive number, but got {args.images}")
    with dropping_stderr_lines():  # the demo's jobs run in this process: keep Ray's noise off its screen too
        if args.scene:
            from segbatch.demo import run_scene_demo

            return run_scene_demo(Path(args.workdir), seed=seed)
        return run_demo(Path(args.workdir), count=args.images, seed=seed)


def _cmd_eval(args: argparse.Namespace) -> int:
    from segbatch.evaluate import evaluate_output, format_report, write_report

    from segbatch.outputs import layer_output

    output = layer_output(args.output, None, args.layer)  # a missing folder is itself: evaluate_output words it
    report = evaluate_output(output, args.truth)
    uri = write_report(report, output)
    print(format_report(report), flush=True)
    print(f"  report     {uri}", flush=True)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """The command line: parse, run the command, map job problems to one line and an exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        handlers = {"run": _cmd_run, "plan": _cmd_plan, "validate": _cmd_validate, "demo": _cmd_demo, "submit": cmd_submit, "eval": _cmd_eval,
                    "export": _cmd_export, "report": _cmd_report}
        return handlers[args.command](args)
    except SpecError as e:
        print(f"segbatch: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except JobError as e:
        print(f"segbatch: job failed: {e}", file=sys.stderr)
        return EXIT_FAILED


def entry() -> None:
    """The `segbatch` console script: :func:`main`, then a clean exit that skips C++ static destructors.

    A process that imported torch and read Parquet with pyarrow sometimes aborted at interpreter exit,
    after its work and its last line were done ("terminate called without an active exception", exit
    code -6 instead of 0 or 1): 8 of 40 `segbatch plan` runs on a loaded 2-core machine, 0 of 40 when
    leaving this way. A scheduler would read such a run as failed. Everything is flushed and Ray is
    disconnected first; an unexpected exception still propagates with its traceback.
    """
    code = main()
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    entry()
