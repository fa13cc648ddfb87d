"""GPU-only paths of the predict actor: autocast, channels_last, pinned copies, nvJPEG decode.

Marked `gpu`; they run wherever CUDA is present (the device machine, a GPU workstation) and skip
with the reason printed (`-ra`) on CPU-only machines such as CI. Each compares the GPU path with the
CPU path on a model whose masks vary, so a wrong layout, a lost orientation or a mixed-up batch fails.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segbatch.load import decode_image
from segbatch.masks import rle_to_mask
from segbatch.models import Predictor, resolve_weights
from segbatch.models.predictor import decode_jpegs
from segbatch.spec import ModelSpec, PredictSettings
from segbatch.synth import scene_from_seed
from tests.varied import assert_varied_instances, assert_varied_labels, varied_lraspp_checkpoint

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: no GPU on this machine"),
]


def _batch(images: list[np.ndarray]) -> dict[str, np.ndarray]:
    col = np.empty(len(images), dtype=object)
    for i, im in enumerate(images):
        col[i] = im
    n = len(images)
    return {
        "item_id": np.asarray([f"id{i}" for i in range(n)], dtype=object),
        "uri": np.asarray([f"/in/{i}.png" for i in range(n)], dtype=object),
        "image": col,
        "status": np.asarray(["ok"] * n, dtype=object),
        "error_class": np.asarray([""] * n, dtype=object),
        "error": np.asarray([""] * n, dtype=object),
    }


def _images() -> list[np.ndarray]:
    return [scene_from_seed(10_000_000 + s, size_range=(160, 224)).image for s in range(4)]


def _on(device: str, predictor: Predictor) -> Predictor:
    """The same predictor moved to `device` (the constructor picks CUDA whenever it is present)."""
    predictor.device = torch.device(device)
    predictor.model = predictor.model.to(predictor.device)
    predictor.mean, predictor.std = predictor.mean.to(predictor.device), predictor.std.to(predictor.device)
    predictor.channels_last = device == "cuda" and predictor.task == "semantic"
    if predictor.channels_last:
        predictor.model = predictor.model.to(memory_format=torch.channels_last)
    return predictor


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_semantic_on_cuda_matches_cpu(tmp_path: Path, precision: str) -> None:
    """channels_last + pinned uint8 copies (+ autocast): the CPU's labels, nearly pixel for pixel."""
    _, ckpt = varied_lraspp_checkpoint(tmp_path / "m.pt")
    rw = resolve_weights(ModelSpec(task="semantic", arch="lraspp_mobilenet_v3_large", weights=str(ckpt), num_classes=4))
    images = _images()
    cpu = _on("cpu", Predictor("semantic", rw, PredictSettings(batch_size=4)))(_batch(images))
    gpu_predictor = Predictor("semantic", rw, PredictSettings(batch_size=4, precision=precision))
    assert gpu_predictor.device.type == "cuda" and gpu_predictor.channels_last
    gpu = gpu_predictor(_batch(images))
    assert_varied_labels(list(cpu["label_map"]))
    agree = 0.999 if precision == "fp32" else 0.98  # half precision moves labels where logits tie
    for a, b in zip(cpu["label_map"], gpu["label_map"]):
        assert a.shape == b.shape and (a == b).mean() >= agree


def test_instance_on_cuda_matches_cpu() -> None:
    rw = resolve_weights(ModelSpec(task="instance", weights="builtin:shapes", score_threshold=0.3))
    settings = PredictSettings(batch_size=4, score_threshold=0.3)
    images = _images()
    cpu = _on("cpu", Predictor("instance", rw, settings))(_batch(images))
    gpu = Predictor("instance", rw, settings)(_batch(images))
    expected = [json.loads(s) for s in cpu["instances"]]
    assert_varied_instances(expected, min_images=3, min_objects=6)
    for image, want, got in zip(images, expected, (json.loads(s) for s in gpu["instances"])):
        h, w = image.shape[:2]
        assert [g["label"] for g in got] == [e["label"] for e in want]
        for g, e in zip(got, want):
            a, b = rle_to_mask(g["rle"], h, w), rle_to_mask(e["rle"], h, w)
            assert (a & b).sum() / (a | b).sum() >= 0.97


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_nvjpeg_decode_matches_the_loader(orientation: int) -> None:
    image = _images()[0]
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=90, exif=exif.tobytes())
    data = buf.getvalue()
    expected = decode_image(data, "mem://a.jpg", 10**8)
    got = decode_jpegs([data], [orientation], torch.device("cuda"))[0]
    assert got.device.type == "cuda"
    got_np = got.permute(1, 2, 0).cpu().numpy()
    assert got_np.shape == expected.shape
    # nvJPEG and libjpeg-turbo may round differently (IDCT, upsampling); the picture is the same.
    assert np.abs(got_np.astype(int) - expected.astype(int)).mean() < 2.0
