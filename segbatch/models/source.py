"""The bytes behind `model.weights` and their digest, without torch.

A job's fingerprint needs only the weights' sha256, and a rerun with nothing left to do needs only the
fingerprint (to check the output's ledger against it). Reading and hashing here, apart from building
and verifying the model (:func:`segbatch.models.weights.resolve_weights`, which needs torch), lets such
a rerun finish without importing torch or starting Ray.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from segbatch.errors import JobError
from segbatch.retry import Retries
from segbatch.spec import ModelSpec
from segbatch.storage import read_bytes

__all__ = ["ResolvedWeights", "WeightsBytes", "read_weights"]


@dataclass(frozen=True, slots=True)
class WeightsBytes:
    """`kind`: none | torchvision | checkpoint | builtin; `payload`: None for `none` (random init)."""

    kind: str
    source: str
    payload: bytes | None
    sha256: str


@dataclass(slots=True)
class ResolvedWeights:
    """What actors need to rebuild the model exactly: bytes + digest + class names + preprocessing.

    Made by :func:`segbatch.models.weights.resolve_weights` (torch); defined here, torch-free, so a driver
    that gets it back from the worker that built the model (:mod:`segbatch.models.remote`) never imports torch.
    """

    kind: str  # none | torchvision | checkpoint | builtin
    source: str
    sha256: str
    payload: bytes | None
    arch: str
    num_classes: int
    classes: tuple[str, ...] | None
    resize: int | tuple[int, int] | None
    mean: tuple[float, float, float] | None  # None: the default (ImageNet; a detector's own transform)
    std: tuple[float, float, float] | None
    extra: dict[str, Any] = field(default_factory=dict)


def _read_checkpoint(spec: ModelSpec) -> bytes:
    """The checkpoint's bytes; transient storage faults are retried (:mod:`segbatch.retry`)."""
    retries = Retries()
    try:
        return read_bytes(spec.weights, spec.storage_options, retries=retries)
    except FileNotFoundError:
        raise JobError(f"model.weights: checkpoint '{spec.weights}' not found") from None
    except Exception as e:  # noqa: BLE001 - any storage failure here is a job-level problem
        after = f" after {retries.count} retries" if retries.count else ""
        raise JobError(
            f"model.weights: cannot read checkpoint '{spec.weights}'{after}: {type(e).__name__}: {e}"
        ) from None


def _builtin(spec: ModelSpec) -> tuple[bytes, str]:
    name = spec.weights.split(":", 1)[1]
    filename = f"{name}-{spec.task}.pt"
    ref = resources.files("segbatch.models").joinpath("builtin", filename)
    if not ref.is_file():
        raise JobError(f"model.weights: no builtin model '{name}' for task '{spec.task}' (looked for {filename})")
    return ref.read_bytes(), filename


def read_weights(spec: ModelSpec) -> WeightsBytes:
    """Read `model.weights` and check `model.sha256`. Torch-free except for `torchvision` weights,
    whose file name comes from torchvision's registry.

    Raises:
        JobError: missing or unreadable weights, or a digest that is not `model.sha256`.
    """
    kind = spec.weights if spec.weights in ("none", "torchvision") else (
        "builtin" if spec.weights.startswith("builtin:") else "checkpoint"
    )
    payload: bytes | None = None
    source = spec.weights
    if kind == "torchvision":
        from segbatch.models.weights import read_torchvision_weights

        payload, source = read_torchvision_weights(spec)
    elif kind == "checkpoint":
        payload = _read_checkpoint(spec)
    elif kind == "builtin":
        payload, filename = _builtin(spec)
        source = f"builtin:{filename}"
    digest = hashlib.sha256(payload).hexdigest() if payload is not None else "none"
    if spec.sha256 and payload is not None and digest != spec.sha256:
        raise JobError(f"model.sha256: checkpoint '{spec.weights}' has sha256 {digest}, expected {spec.sha256}")
    return WeightsBytes(kind=kind, source=source, payload=payload, sha256=digest)
