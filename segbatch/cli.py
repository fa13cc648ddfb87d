"""`segbatch` command line: run | plan | validate | demo | submit | eval.

Exit codes: 0 the job finished (per-item errors within `run.max_error_fraction`); 1 the job failed
(a job-level error, or too many item errors: everything is still written); 2 a bad job file or
command line, reported before Ray starts.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from segbatch.errors import JobError
from segbatch.spec import SpecError, add_override_argument, load_job
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
        "demo", help="generate fresh scenes with truth, run jobs/demo.yaml and jobs/demo-instance.yaml, score both"
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
    return parser


def _cmd_run(args: argparse.Namespace) -> int:
    spec = load_job(args.job, args.overrides)
    from segbatch.pipeline import run_job
    from segbatch.result import format_summary

    result = run_job(spec, force=args.force)
    print(format_summary(result), flush=True)
    return EXIT_FAILED if result.failed_budget else EXIT_OK


def _cmd_plan(args: argparse.Namespace) -> int:
    """Weights are resolved (their digest is part of the fingerprint the ledger is checked against), never built."""
    spec = load_job(args.job, args.overrides)
    from segbatch.models.weights import resolve_weights
    from segbatch.outputs import read_ledger
    from segbatch.plan import count_plan, listing_errors
    from segbatch.result import format_plan

    started = time.time()
    weights = resolve_weights(spec.model)
    o = spec.output
    try:
        ledger = read_ledger(o.uri, o.storage_options, spec.result_fingerprint(weights.sha256))
    except (JobError, SpecError):
        raise
    except Exception as e:  # noqa: BLE001 - a storage problem is one line, exit 1
        raise JobError(f"cannot read the outputs under output.uri '{o.uri}': {type(e).__name__}: {e}") from None
    with listing_errors(spec.input.uri):
        counts = count_plan(spec.input, ledger, tiling=spec.tiling)
    print(format_plan(args.job, spec.input.uri, o.uri, counts, time.time() - started), flush=True)
    return EXIT_OK


def _cmd_validate(args: argparse.Namespace) -> int:
    spec = load_job(args.job, args.overrides)
    line = f"{args.job}: ok ({spec.model.task}, {spec.model.arch or spec.model.weights}, output {spec.output.uri})"
    if args.check_storage:
        from segbatch.models.weights import resolve_weights
        from segbatch.plan import count_plan

        weights = resolve_weights(spec.model)
        listed = count_plan(spec.input, tiling=spec.tiling).listed
        line += f"; weights sha256 {weights.sha256[:12]}; {listed} images listed"
    print(line)
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from segbatch.demo import DEMO_SEED, run_demo

    if args.scene:
        from segbatch.demo import run_scene_demo

        return run_scene_demo(Path(args.workdir), seed=DEMO_SEED if args.seed is None else args.seed)
    if args.images < 1:
        raise JobError(f"segbatch demo: --images expected a positive number, but got {args.images}")
    return run_demo(Path(args.workdir), count=args.images, seed=DEMO_SEED if args.seed is None else args.seed)


def _cmd_eval(args: argparse.Namespace) -> int:
    from segbatch.evaluate import evaluate_output, format_report, write_report

    report = evaluate_output(args.output, args.truth)
    uri = write_report(report, args.output)
    print(format_report(report), flush=True)
    print(f"  report     {uri}", flush=True)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `segbatch` console script."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        handlers = {"run": _cmd_run, "plan": _cmd_plan, "validate": _cmd_validate, "demo": _cmd_demo, "submit": cmd_submit, "eval": _cmd_eval}
        return handlers[args.command](args)
    except SpecError as e:
        print(f"segbatch: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except JobError as e:
        print(f"segbatch: job failed: {e}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
