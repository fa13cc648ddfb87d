"""Weights: resolve `model.weights` once per run, verify it, and ship the bytes to every actor.

The driver reads the bytes and their digest (:mod:`segbatch.models.source`, no torch); the model is built
here once, in a one-shot Ray worker (:mod:`segbatch.models.remote`), to prove the weights fit it. So a
missing file, a bad digest or a checkpoint that does not fit the architecture stops the job before any
work starts, and every actor loads the very same bytes (passed through Ray's object store), whichever
node it runs on.
"""

from __future__ import annotations

import io
import os
import pickle
from typing import Any

import torch
from torch import nn

from segbatch.errors import JobError
from segbatch.models.archs import INSTANCE_ARCHS, SEMANTIC_ARCHS
from segbatch.models.source import ResolvedWeights, WeightsBytes, read_weights
from segbatch.spec import ModelSpec

__all__ = ["ResolvedWeights", "load_state_dict_bytes", "resolve_weights", "apply_weights", "torchvision_cache_path"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def torchvision_cache_path(arch: str, cache_dir: str | None) -> tuple[str, str]:
    """(local file path, download URL) of an arch's DEFAULT torchvision weights."""
    from torchvision.models import get_model_weights

    enum = get_model_weights(arch).DEFAULT
    directory = cache_dir or os.path.join(torch.hub.get_dir(), "checkpoints")
    return os.path.join(directory, os.path.basename(enum.url)), enum.url


def load_state_dict_bytes(data: bytes, source: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a checkpoint with `weights_only=True`; unwrap `{"state_dict": ...}`/`{"model": ...}`.

    Returns:
        The state dict and the checkpoint's other plain entries (e.g. `classes`).

    Raises:
        JobError: the file is not a plain tensor checkpoint (e.g. a pickle that would run code).
    """
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, EOFError, TypeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise JobError(
            f"checkpoint '{source}' refused: it cannot be loaded with weights_only=True ({first}). "
            "Only plain state_dict checkpoints are accepted, since a pickle can run arbitrary code; "
            "save one with torch.save(model.state_dict(), path)."
        ) from None
    if not isinstance(obj, dict):
        raise JobError(f"checkpoint '{source}' expected a state_dict (a dict of tensors), but got {type(obj).__name__}")
    meta: dict[str, Any] = {}
    for key in ("state_dict", "model"):
        if isinstance(obj.get(key), dict):
            meta = {k: v for k, v in obj.items() if k != key}
            obj = obj[key]
            break
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise JobError(f"checkpoint '{source}' expected tensors only, but '{bad[0]}' is a {type(obj[bad[0]]).__name__}")
    return obj, meta


def apply_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a state dict strictly, ignoring only torchvision's training-time auxiliary head."""
    own = model.state_dict()
    state = {k: v for k, v in state.items() if not (k.startswith("aux_classifier.") and k not in own)}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        what = f"missing keys {missing[:3]}" if missing else f"unexpected keys {unexpected[:3]}"
        raise JobError(f"checkpoint '{source}' does not fit the model: {what} (check model.arch)")
    for k, v in state.items():
        if own[k].shape != v.shape:
            raise JobError(
                f"checkpoint '{source}': '{k}' has shape {tuple(v.shape)} but the model expects {tuple(own[k].shape)} "
                "(check model.num_classes / model.classes)"
            )
    model.load_state_dict(state, strict=True)






def read_torchvision_weights(spec: ModelSpec) -> tuple[bytes, str]:
    """(the bytes of the arch's DEFAULT torchvision weights from torch hub's cache, their source name)."""
    from torchvision.models import get_model_weights

    assert spec.arch is not None  # guaranteed by ModelSpec validation
    path, url = torchvision_cache_path(spec.arch, spec.cache_dir)
    if not os.path.exists(path):
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.hub.download_url_to_file(url, path, progress=False)
        except Exception as e:  # noqa: BLE001 - offline machines are expected; say what to do
            raise JobError(
                f"model.weights: torchvision weights for '{spec.arch}' are not cached at '{path}' and downloading "
                f"{url} failed ({type(e).__name__}). Pre-stage the file: download it elsewhere and copy it to "
                f"'{path}' (or set model.cache_dir / TORCH_HOME), or point model.weights at a copy in your storage."
            ) from None
    with open(path, "rb") as f:
        return f.read(), f"torchvision:{get_model_weights(spec.arch).DEFAULT}"


def resolve_weights(spec: ModelSpec, read: WeightsBytes | None = None) -> ResolvedWeights:
    """Resolve, read and verify `model.weights`, then prove they load into the architecture.

    `read` is the weights already read (:func:`segbatch.models.source.read_weights`), else they are read here.

    Raises:
        JobError: one line saying what is wrong and what to change.
    """
    from segbatch.models.zoo import DEFAULT_NUM_CLASSES, build_model

    read = read if read is not None else read_weights(spec)
    kind, source, payload, digest = read.kind, read.source, read.payload, read.sha256
    classes: tuple[str, ...] | None = None
    arch = spec.arch
    resize: int | tuple[int, int] | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    meta: dict[str, Any] = {}

    if kind == "torchvision":
        from torchvision.models import get_model_weights

        assert arch is not None
        enum = get_model_weights(arch).DEFAULT
        classes = tuple(enum.meta["categories"])
        preset = enum.transforms()
        if arch in SEMANTIC_ARCHS:
            resize = int(preset.resize_size[0])
            mean, std = tuple(preset.mean), tuple(preset.std)  # type: ignore[assignment]

    state: dict[str, torch.Tensor] | None = None
    if payload is not None:
        state, meta = load_state_dict_bytes(payload, spec.weights)
        if classes is None and isinstance(meta.get("classes"), (list, tuple)):
            classes = tuple(str(c) for c in meta["classes"])
        if arch is None and isinstance(meta.get("arch"), str):
            arch = meta["arch"]
        if spec.resize is None and meta.get("resize") is not None:
            r = meta["resize"]
            resize = int(r) if isinstance(r, int) else tuple(r)  # type: ignore[assignment]
        if isinstance(meta.get("mean"), (list, tuple)):
            mean = tuple(float(x) for x in meta["mean"])  # type: ignore[assignment]
        if isinstance(meta.get("std"), (list, tuple)):
            std = tuple(float(x) for x in meta["std"])  # type: ignore[assignment]
    if spec.classes is not None:
        if classes is not None and len(classes) != len(spec.classes):
            raise JobError(
                f"model.classes names {len(spec.classes)} classes but the weights have {len(classes)} ({source})"
            )
        classes = spec.classes
    if arch is None:
        raise JobError(f"model.arch is required: the weights '{source}' do not name their architecture")
    if arch in INSTANCE_ARCHS and spec.task != "instance" or arch in SEMANTIC_ARCHS and spec.task != "semantic":
        raise JobError(f"model.task is '{spec.task}' but the weights' architecture '{arch}' is not")
    num_classes = spec.num_classes or (len(classes) if classes else DEFAULT_NUM_CLASSES[spec.task])
    if classes is not None and len(classes) != num_classes:
        raise JobError(f"model.num_classes is {num_classes} but the weights name {len(classes)} classes ({source})")

    try:
        model = build_model(spec.task, arch, num_classes)
    except (ImportError, TypeError) as e:
        raise JobError(str(e)) from None
    if state is not None:
        apply_weights(model, state, source)
    del model
    return ResolvedWeights(
        kind=kind,
        source=source,
        sha256=digest,
        payload=payload,
        arch=arch,
        num_classes=num_classes,
        classes=classes,
        resize=spec.resize if spec.resize is not None else resize,
        mean=spec.mean or mean,
        std=spec.std or std,
        extra={k: v for k, v in meta.items() if isinstance(v, (str, int, float))},
    )
