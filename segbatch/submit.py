"""`segbatch submit`: send a job to a running Ray cluster through Ray's Jobs API.

The job file is validated here first (a bad file never reaches the cluster), then copied, with any
`--set` overrides applied, into a temporary folder that Ray uploads as the job's `working_dir`; the
cluster runs `segbatch run <file>` in it. The default submission id is `<job name>-<UTC date>`, so a
scheduled submit is idempotent: Ray refuses a reused id, which is reported as "already submitted".

Authentication: Ray 2.60 clusters use token authentication. The token is read the way Ray reads it
(`RAY_AUTH_TOKEN`, else the file in `RAY_AUTH_TOKEN_PATH`, else `~/.ray/auth_token`) and sent as a
bearer header, even when `RAY_AUTH_MODE` is not set in this shell. It is never printed.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

import yaml

from segbatch.errors import first_line
from segbatch.spec import JobSpec, add_override_argument, load_job

__all__ = [
    "Submission",
    "SubmitError",
    "add_submit_parser",
    "auth_headers",
    "cmd_submit",
    "connect",
    "default_submission_id",
    "follow_job",
    "staged_job",
    "submit_job",
]

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED = 0, 1
_TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class SubmitError(RuntimeError):
    """The cluster could not be reached or refused the job; the message says what to change."""


@dataclass(slots=True)
class Submission:
    """What `submit_job` did.

    Attributes:
        submission_id: The Ray job's submission id.
        already_submitted: True when a job with this id existed, so nothing new was started.
    """

    submission_id: str
    already_submitted: bool


def default_submission_id(spec: JobSpec, now: datetime | None = None) -> str:
    """`<job name>-<UTC date YYYYMMDD>`: one submission per job and day, so reruns are idempotent.

    Example:
        >>> from datetime import datetime, timezone
        >>> default_submission_id(spec, datetime(2026, 1, 2, 23, 0, tzinfo=timezone.utc))  # doctest: +SKIP
        'nightly-20260102'
    """
    now = now or datetime.now(timezone.utc)
    return f"{spec.name}-{now.astimezone(timezone.utc):%Y%m%d}"


def _local_path_warnings(spec: JobSpec) -> list[str]:
    out = []
    for key, uri in (("input.uri", spec.input.uri), ("output.uri", spec.output.uri)):
        if "://" in uri:
            continue
        if not os.path.isabs(uri):
            out.append(
                f"{key} '{uri}' is a relative local path: on the cluster it resolves inside the job's "
                "temporary working_dir; use an absolute path or an object-store URI (s3://, gs://)"
            )
        else:
            out.append(f"{key} '{uri}' is a local path: every cluster node must see it (shared filesystem)")
    return out


@contextmanager
def staged_job(job: str | Path, overrides: list[str] | None = None) -> Iterator[tuple[JobSpec, Path]]:
    """Validate a job file and stage it alone in a temporary folder (the job's `working_dir`).

    The staged copy is the validated spec with the overrides applied (unset defaults left out), and
    it is validated again, so what runs on the cluster is exactly what was checked here.

    Args:
        job: Path of the job YAML.
        overrides: `--set` assignments (`dotted.key=value`).

    Yields:
        The spec and the staged file's path; the folder is removed on exit.

    Raises:
        SpecError: the job file (with overrides) is not valid.
    """
    spec = load_job(job, overrides)
    folder = Path(tempfile.mkdtemp(prefix="segbatch-submit-"))
    try:
        staged = folder / Path(job).name
        staged.write_text(yaml.safe_dump(spec.model_dump(mode="json", exclude_unset=True), sort_keys=False))
        load_job(staged)
        yield spec, staged
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def auth_headers() -> dict[str, str]:
    """The `Authorization` header for a token-authenticated Ray cluster, or {} when there is no token.

    The token comes from `RAY_AUTH_TOKEN`, else the file named by `RAY_AUTH_TOKEN_PATH`, else
    `~/.ray/auth_token`, as in Ray. `RAY_AUTH_MODE=disabled` sends none.

    Raises:
        SubmitError: `RAY_AUTH_TOKEN_PATH` names a file that cannot be read.
    """
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return {}
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        explicit = os.environ.get("RAY_AUTH_TOKEN_PATH")
        path = Path(explicit) if explicit else Path.home() / ".ray" / "auth_token"
        try:
            token = path.read_text().strip()
        except FileNotFoundError:
            if explicit:
                raise SubmitError(
                    f"RAY_AUTH_TOKEN_PATH '{explicit}' does not exist; point it at the token file"
                ) from None
            token = ""
        except OSError as e:
            raise SubmitError(f"cannot read the Ray token file '{path}': {e.strerror or e}") from None
    return {"Authorization": f"Bearer {token}"} if token else {}


def connect(address: str) -> Any:
    """A `JobSubmissionClient` for the dashboard at `address` (e.g. `http://127.0.0.1:8265`).

    Raises:
        ImportError: Ray's job client is missing (`pip install 'ray[default]'`).
        SubmitError: the address cannot be reached, or the token was refused.
    """
    try:
        from ray.job_submission import JobSubmissionClient
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("segbatch submit needs Ray's job client: pip install 'ray[default]'") from e
    try:
        return JobSubmissionClient(address, headers=auth_headers())
    except SubmitError:
        raise
    except (ConnectionError, RuntimeError, ValueError, OSError) as e:
        raise SubmitError(
            f"cannot reach the Ray Jobs API at '{address}': {_first_line(e)}; check --address (the dashboard "
            "URL, port 8265) and, on a token-authenticated cluster, RAY_AUTH_TOKEN or ~/.ray/auth_token"
        ) from None


def _first_line(e: BaseException) -> str:
    return first_line(e) or type(e).__name__


def _exists(client: Any, submission_id: str) -> bool:
    try:
        client.get_job_info(submission_id)
    except (RuntimeError, OSError) as e:
        if "404" in str(e) or "does not exist" in str(e):
            return False
        raise SubmitError(f"cannot look up submission '{submission_id}': {_first_line(e)}") from None
    return True


def submit_job(
    client: Any, staged: Path, submission_id: str, spec: JobSpec, agent_wait_seconds: float = 60.0
) -> Submission:
    """Submit a staged job file, or report that `submission_id` was already used.

    Args:
        client: From :func:`connect`.
        staged: The staged job file (its folder becomes the job's `working_dir`).
        submission_id: Ray submission id; a reused one is not started again.
        spec: The validated spec (for the job's metadata).
        agent_wait_seconds: How long to retry while the head's job agent is not up yet (a cluster
            that just started answers "No available agent to submit job, please try again later").

    Returns:
        The submission id and whether it already existed.

    Raises:
        SubmitError: Ray refused the job for another reason.
    """
    if _exists(client, submission_id):
        return Submission(submission_id, already_submitted=True)
    deadline = time.monotonic() + agent_wait_seconds
    while True:
        try:
            client.submit_job(
                entrypoint=f"segbatch run {staged.name}",
                submission_id=submission_id,
                runtime_env={"working_dir": str(staged.parent)},
                metadata={"segbatch.job": spec.name},
            )
        except (RuntimeError, OSError) as e:
            if "already exists" in str(e):
                return Submission(submission_id, already_submitted=True)
            if "try again later" in str(e) and time.monotonic() < deadline:
                logger.info("the cluster's job agent is not ready yet; retrying")
                time.sleep(2.0)
                continue
            raise SubmitError(f"Ray refused submission '{submission_id}': {_first_line(e)}") from None
        return Submission(submission_id, already_submitted=False)


def follow_job(client: Any, submission_id: str, out: TextIO, poll_seconds: float = 1.0) -> str:
    """Stream a job's logs to `out` until it ends; returns its final status (`SUCCEEDED`, ...).

    Raises:
        SubmitError: the log stream or status lookups failed.
    """

    async def _tail() -> None:
        async for chunk in client.tail_job_logs(submission_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(_tail())
    except Exception as e:  # the stream is best effort: the job's status below is the outcome
        logger.warning(
            "log stream for %s ended early (%s); waiting for the job's status", submission_id, _first_line(e)
        )
    while True:
        try:
            status = str(client.get_job_status(submission_id).value)
        except (RuntimeError, OSError) as e:
            raise SubmitError(f"cannot read the status of '{submission_id}': {_first_line(e)}") from None
        if status in _TERMINAL:
            return status
        time.sleep(poll_seconds)


def add_submit_parser(sub: Any) -> None:
    """Add the `submit` subcommand to the CLI's subparsers."""
    p = sub.add_parser("submit", help="send a job to a running Ray cluster (Ray Jobs API)")
    p.add_argument("job", help="job YAML file (validated here first)")
    p.add_argument(
        "--address",
        default=os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS"),
        help="Ray dashboard URL, e.g. http://127.0.0.1:8265 (default: $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS)",
    )
    p.add_argument("--id", dest="submission_id", help="submission id (default: <job name>-<UTC date YYYYMMDD>)")
    p.add_argument("--wait", action="store_true", help="stream the job's logs; exit 0 if it succeeded, 1 if not")
    add_override_argument(p, "a job key in the submitted copy")


def cmd_submit(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run `segbatch submit` (CLI layer: writes to `out`/`err`).

    Returns:
        0 submitted (or already submitted), or with `--wait` the job succeeded; 1 it failed or was
        stopped, or the cluster could not be used. A bad job file raises SpecError (exit 2) before
        Ray is contacted.
    """
    out, err = out or sys.stdout, err or sys.stderr
    with staged_job(args.job, args.overrides) as (spec, staged):
        if not args.address:
            err.write("segbatch: error: submit needs --address http://HEAD:8265 (or RAY_ADDRESS)\n")
            return 2
        for warning in _local_path_warnings(spec):
            logger.warning(warning)
        submission_id = args.submission_id or default_submission_id(spec)
        try:
            client = connect(args.address)
            result = submit_job(client, staged, submission_id, spec)
        except SubmitError as e:
            err.write(f"segbatch: submit failed: {e}\n")
            return EXIT_FAILED
    if result.already_submitted:
        out.write(f"segbatch: {submission_id} already submitted to {args.address}; not starting it again\n")
    else:
        out.write(f"segbatch: submitted {submission_id} to {args.address}\n")
    out.flush()
    if not args.wait:
        return EXIT_OK
    try:
        status = follow_job(client, submission_id, out)
    except SubmitError as e:
        err.write(f"segbatch: {e}\n")
        return EXIT_FAILED
    out.write(f"segbatch: {submission_id} {status}\n")
    return EXIT_OK if status == "SUCCEEDED" else EXIT_FAILED
