"""What a run did (:class:`RunResult`) and the summaries a person reads: no Ray, no torch here."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from segbatch.outputs import ERRORS, MASKS, METADATA
from segbatch.plan import PlanCounts

__all__ = ["RunResult", "format_plan", "format_summary", "result_dict"]


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
    excluded: int = 0  # listed objects under output.uri, left out of the plan
    unfinished: int = 0  # several-model jobs: items some layers held already (plan.PlanCounts.unfinished)
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
    #: Several-model jobs: per layer, its output, manifest and committed counts (the fields above add them up).
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def failed_budget(self) -> bool:
        return self.error_fraction > self.max_error_fraction


def result_dict(result: RunResult) -> dict[str, Any]:
    """The result as plain data (for `--json` output)."""
    return asdict(result)


def format_summary(result: RunResult) -> str:
    """The end-of-run summary a person reads: counts, errors by class, speed, where outputs are."""
    out = result.output_uri.rstrip("/")
    errors = ", ".join(f"{k}: {v}" for k, v in result.errors.items()) or "none"
    verdict = "FAILED (error budget exceeded)" if result.failed_budget else "finished"
    lines = [
        f"segbatch: run {result.run_id} {verdict} in {result.wall_seconds:.1f} s",
        f"  items      listed {result.listed} · skipped {result.skipped} (already done) · "
        f"processed {result.processed} ({result.new} new, {result.changed} changed) · ok {result.ok} · "
        f"error {result.error_count} · storage retries {result.retried}{_excluded(result.excluded)}",
        f"  errors     {errors} (fraction {result.error_fraction:.3f}, budget {result.max_error_fraction:.3f})",
        _speed_line(result),
    ]
    if result.layers:  # a several-model job: each layer's output is a single-model output
        lines[1] = (
            f"  items      listed {result.listed} · skipped {result.skipped} (done in every layer) · "
            f"{result.new} new, {result.changed} changed, {result.unfinished} unfinished · "
            f"results {result.processed} (one per image and layer) · "
            f"ok {result.ok} · error {result.error_count} · storage retries {result.retried}{_excluded(result.excluded)}"
        )
        for name, layer in result.layers.items():
            layer_errors = sum(layer["errors"].values())
            lines.append(
                f"  layer      {name}: ok {layer['ok']} · error {layer_errors} → {layer['output_uri'].rstrip('/')}/ "
                f"({MASKS}/, {METADATA}/, {ERRORS}/)"
            )
    else:
        lines += [f"  masks      {out}/{MASKS}/", f"  metadata   {out}/{METADATA}/*.parquet (errors also in {out}/{ERRORS}/)"]
    lines.append(f"  manifest   {result.manifest_uri}")
    return "\n".join(lines)


def _speed_line(result: RunResult) -> str:
    """Start-up, the steady rate and the whole run apart: on a small job start-up is most of the time."""
    if not result.processed:
        return "  speed      nothing to process"
    unit = "results" if result.layers else "images"
    steady = f"{result.steady_images_per_second:.2f} {unit}/s" if result.steady_images_per_second else "too few results to measure"
    return (
        f"  speed      start-up {result.first_result_seconds:.1f} s (Ray, actors, model load) · steady {steady} · "
        f"{result.processed} {unit} in {result.stream_seconds:.1f} s overall ({result.images_per_second:.2f} {unit}/s)"
    )


def _excluded(count: int) -> str:
    return f" · {count} objects under output.uri left out (outputs are never inputs)" if count else ""


def format_plan(
    job: str, input_uri: str, output_uri: str, counts: PlanCounts, seconds: float, layers: list[str] | None = None
) -> str:
    """What `segbatch plan` prints: the counts a run of the job would start from (and per layer, what
    each lacks, for a several-model job)."""
    lines = [
        f"segbatch: plan of {job} ({seconds:.1f} s)",
        f"  input      {input_uri}",
        f"  output     {output_uri}",
        f"  items      listed {counts.listed} · new {counts.new} · changed {counts.changed} · "
        + (f"unfinished {counts.unfinished} · " if layers else "")
        + f"already done {counts.skipped} · to process {counts.todo}{_excluded(counts.excluded)}",
    ]
    for k, name in enumerate(layers or []):
        todo = counts.layer_todo[k] if counts.layer_todo else 0
        lines.append(f"  layer      {name}: to process {todo} · already done {counts.listed - todo}")
    return "\n".join(lines)
