"""The model's torch side, reached from a driver that never imports torch.

The driver plans, commits and (in scene jobs) assembles COGs and polygons; it needs of the model only
its digest (:mod:`segbatch.models.source`), arch, classes and preprocessing. Importing torch and
torchvision there to build the model once (the proof that the weights fit) kept ~430 MB of PSS in the
driver for the whole run (`benchmarks/README.md`, "Scenes"). So the proof runs in a one-shot Ray task
whose worker exits afterwards (:func:`resolve_on_cluster`), and the predict actor pool is given
:class:`PredictStage`, which imports the predictor inside the actor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from segbatch.errors import JobError
from segbatch.models.source import ResolvedWeights, WeightsBytes
from segbatch.spec import ModelSpec

__all__ = ["PredictStage", "fix_mmap_threshold", "resolve_on_cluster"]


def _resolve(spec: ModelSpec, read: WeightsBytes) -> ResolvedWeights:
    """In the worker: build the model, prove the weights fit; the bytes are not sent back (the driver has them)."""
    from segbatch.models.weights import resolve_weights

    return replace(resolve_weights(spec, read), payload=None)


def resolve_on_cluster(models: Sequence[tuple[ModelSpec, WeightsBytes]]) -> list[ResolvedWeights]:
    """:func:`segbatch.models.weights.resolve_weights` for each model (a job's one, or every layer's), each in
    a Ray worker that exits afterwards, all at once (needs Ray).

    Raises:
        JobError: some weights do not fit (the worker's one-line message, without Ray's traceback).
    """
    import ray

    task = ray.remote(num_cpus=0, max_calls=1, max_retries=0)(_resolve)
    try:
        resolved = ray.get([task.remote(spec, read) for spec, read in models])
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, JobError):
            raise JobError(str(e.cause)) from None
        raise
    return [replace(r, payload=read.payload) for r, (_, read) in zip(resolved, models)]


#: glibc's `mallopt` parameter number of M_MMAP_THRESHOLD, and the value it starts with (128 KiB).
_M_MMAP_THRESHOLD, _MMAP_THRESHOLD = -3, 128 * 1024


def fix_mmap_threshold() -> bool:
    """Keep glibc's mmap threshold at 128 KiB in this process, so large freed blocks go back to the OS.

    glibc raises the threshold to the size of the largest mmapped block freed (up to 32 MiB); after the
    first batch, activations of tens of MB come from malloc's arenas (one per calling thread) and are kept
    there once freed. A predict actor grew by 300-450 MB PSS over a scene job that way, by how its
    threads happened to allocate (`benchmarks/README.md`, "Scenes"). Returns False where libc is not
    glibc (macOS, musl): nothing is changed there.
    """
    import ctypes

    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False


class PredictStage:
    """The predict actor for Ray Data: :class:`segbatch.models.predictor.Predictor`, or with a `layers`
    argument :class:`~segbatch.models.predictor.LayerPredictor`, imported in the actor (whose process gets
    :func:`fix_mmap_threshold`).

    Takes the predictor's constructor arguments; called with a batch, as the predictor is.
    """

    def __init__(self, **kwargs: Any) -> None:
        from segbatch.models.predictor import LayerPredictor, Predictor

        fix_mmap_threshold()

        self._predictor = LayerPredictor(**kwargs) if "layers" in kwargs else Predictor(**kwargs)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        return self._predictor(batch)
