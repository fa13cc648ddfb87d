"""Weights resolution and the predictor called directly (no Ray)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from segbatch.errors import JobError
from segbatch.models import Predictor, resolve_weights
from segbatch.models.small import maskrcnn_small
from segbatch.models.weights import torchvision_cache_path
from segbatch.spec import ModelSpec, PredictSettings
from tests.conftest import save_checkpoint
from tests.varied import (
    assert_varied_instances,
    assert_varied_labels,
    builtin_shapes_detector,
    direct_instances,
    direct_labels,
    varied_lraspp_checkpoint,
)

ARCH = "lraspp_mobilenet_v3_large"


def lraspp(num_classes: int = 4) -> torch.nn.Module:
    torch.manual_seed(1)
    return torchvision.models.get_model(ARCH, weights=None, weights_backbone=None, num_classes=num_classes).eval()


def test_checkpoint_digest_classes_and_sha_check(tmp_path: Path) -> None:
    ckpt = save_checkpoint(lraspp(), tmp_path / "m.pt", classes=["bg", "a", "b", "c"])
    import hashlib

    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    rw = resolve_weights(ModelSpec(task="semantic", arch=ARCH, weights=str(ckpt), sha256=digest))
    assert rw.sha256 == digest and rw.classes == ("bg", "a", "b", "c") and rw.num_classes == 4
    with pytest.raises(JobError, match=f"has sha256 {digest}, expected 0{{64}}"):
        resolve_weights(ModelSpec(task="semantic", arch=ARCH, weights=str(ckpt), sha256="0" * 64))


def test_checkpoint_that_does_not_fit_is_refused_before_work(tmp_path: Path) -> None:
    ckpt = save_checkpoint(lraspp(4), tmp_path / "m.pt")
    with pytest.raises(JobError, match=r"has shape \(4, 40, 1, 1\) but the model expects \(7, 40, 1, 1\)"):
        resolve_weights(ModelSpec(task="semantic", arch=ARCH, weights=str(ckpt), num_classes=7))
    with pytest.raises(JobError, match="does not fit the model"):
        resolve_weights(ModelSpec(task="semantic", arch="fcn_resnet50", weights=str(ckpt), num_classes=4))
    with pytest.raises(JobError, match="not found"):
        resolve_weights(ModelSpec(task="semantic", arch=ARCH, weights=str(tmp_path / "nope.pt")))


class _Evil:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, ("touch /tmp/segbatch-pwned",))


def test_pickle_that_runs_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": lraspp().state_dict(), "payload": _Evil()}, path)
    if os.path.exists("/tmp/segbatch-pwned"):
        os.remove("/tmp/segbatch-pwned")
    with pytest.raises(JobError, match="refused: it cannot be loaded with weights_only=True"):
        resolve_weights(ModelSpec(task="semantic", arch=ARCH, weights=str(path)))
    assert not os.path.exists("/tmp/segbatch-pwned")
    (tmp_path / "raw.pkl").write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(JobError, match="refused"):
        resolve_weights(ModelSpec(task="semantic", arch=ARCH, weights=str(tmp_path / "raw.pkl")))
    assert not os.path.exists("/tmp/segbatch-pwned")


def test_torchvision_weights_offline_error_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(url: str, dst: str, **_: object) -> None:  # this machine has no network: say so explicitly
        raise ConnectionError(f"cannot reach {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    spec = ModelSpec(task="semantic", arch=ARCH, weights="torchvision", cache_dir=str(tmp_path))
    path, url = torchvision_cache_path(ARCH, str(tmp_path))
    with pytest.raises(JobError) as err:
        resolve_weights(spec)
    assert path in str(err.value) and url in str(err.value) and "Pre-stage" in str(err.value)


def test_torchvision_weights_from_cache_use_their_preset_and_categories(tmp_path: Path) -> None:
    path, _ = torchvision_cache_path(ARCH, str(tmp_path))
    torch.manual_seed(0)
    model = torchvision.models.get_model(ARCH, weights=None, weights_backbone=None, num_classes=21)
    torch.save(model.state_dict(), path)
    rw = resolve_weights(ModelSpec(task="semantic", arch=ARCH, weights="torchvision", cache_dir=str(tmp_path)))
    assert rw.classes is not None and rw.classes[:3] == ("__background__", "aeroplane", "bicycle")
    assert rw.num_classes == 21 and rw.resize == 520


def test_user_factory_is_built_and_checked(tmp_path: Path) -> None:
    ckpt = save_checkpoint(maskrcnn_small(4), tmp_path / "small.pt")
    rw = resolve_weights(
        ModelSpec(task="instance", arch="segbatch.models.small:maskrcnn_small", weights=str(ckpt), num_classes=4)
    )
    assert rw.arch == "segbatch.models.small:maskrcnn_small"
    with pytest.raises(JobError, match="cannot import module"):
        resolve_weights(ModelSpec(task="instance", arch="nosuchpkg.models:build", weights="none"))


def _semantic_predictor(ckpt: Path, **options: object) -> Predictor:
    rw = resolve_weights(ModelSpec(task="semantic", arch=ARCH, weights=str(ckpt), num_classes=4))
    return Predictor("semantic", rw, PredictSettings(**{"batch_size": 4, **options}))


def _batch(images: list[np.ndarray], status: list[str] | None = None) -> dict[str, np.ndarray]:
    n = len(images)
    col = np.empty(n, dtype=object)
    for i, im in enumerate(images):
        col[i] = im
    return {
        "item_id": np.array([f"id{i}" for i in range(n)], dtype=object),
        "uri": np.array([f"/in/img{i}.png" for i in range(n)], dtype=object),
        "image": col,
        "status": np.array(status or ["ok"] * n, dtype=object),
        "error_class": np.array([""] * n, dtype=object),
        "error": np.array([""] * n, dtype=object),
    }


def test_semantic_batch_equals_single_and_skips_error_rows(tmp_path: Path) -> None:
    """Mixed sizes and same-size groups in one batch: each image gets exactly its own single-call mask.

    The varied model makes this able to fail: zero-padding the batch to one size moves 0.6-2.7% of
    its labels, and a result handed to another image of its group gives a different mask.
    """
    model, ckpt = varied_lraspp_checkpoint(tmp_path / "m.pt")
    pred = _semantic_predictor(ckpt)
    rng = np.random.default_rng(0)
    sizes = [(64, 96), (96, 64), (64, 96), (50, 70), (64, 96)]
    images = [np.clip(_gradient(h, w) + rng.integers(0, 60, size=(h, w, 3)), 0, 255).astype(np.uint8) for h, w in sizes]
    images.insert(2, np.zeros((0, 0, 3), np.uint8))
    status = ["ok", "ok", "error", "ok", "ok", "ok"]
    expected = {i: direct_labels(model, im) for i, im in enumerate(images) if status[i] == "ok"}
    assert_varied_labels(list(expected.values()))
    out = pred(_batch(images, status))
    assert "image" not in out
    assert out["label_map"][2].size == 0 and out["status"][2] == "error"
    for i, want in expected.items():
        alone = pred(_batch([images[i]]))["label_map"][0]
        assert (alone == want).mean() >= 0.999, "the predictor alone differs from the model called by hand"
        got = out["label_map"][i]
        assert got.shape == images[i].shape[:2] and got.dtype == np.uint8
        assert (got == alone).mean() >= 0.999, f"image {i} {images[i].shape[:2]}: batched mask differs from its own"
        assert out["class_pixels"][i].sum() == images[i].shape[0] * images[i].shape[1]
        assert list(out["class_pixels"][i]) == list(np.bincount(got.ravel(), minlength=4))


def _gradient(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx * yy) % 256], axis=-1)


def test_instance_predictor_equals_the_detector_called_by_hand() -> None:
    """builtin:shapes on generated scenes, several of them one size: the predictor's RLEs, boxes, scores
    and labels are the hand-built torchvision detector's, image by image."""
    from segbatch.masks import rle_to_mask
    from segbatch.synth import scene_from_seed

    detector = builtin_shapes_detector(score_threshold=0.3)
    scenes = [scene_from_seed(10_000_000 + s, size_range=(160, 160)) for s in range(3)]
    scenes += [scene_from_seed(10_000_100, size_range=(120, 200))]
    images = [s.image for s in scenes]
    expected = [direct_instances(detector, im) for im in images]
    assert_varied_instances(expected, min_images=3, min_objects=6)
    rw = resolve_weights(ModelSpec(task="instance", weights="builtin:shapes", score_threshold=0.3))
    out = Predictor("instance", rw, PredictSettings(batch_size=4, score_threshold=0.3, instance_png=True))(_batch(images))
    import json

    for i, (image, want) in enumerate(zip(images, expected)):
        got = json.loads(out["instances"][i])
        h, w = image.shape[:2]
        assert len(got) == len(want), f"image {i}: {len(got)} instances, the detector found {len(want)}"
        for g, e in zip(got, sorted(want, key=lambda d: -d["score"])):
            mask = rle_to_mask(g["rle"], h, w)
            assert g["label"] == e["label"] and abs(g["score"] - e["score"]) < 1e-4
            assert (mask & e["mask"]).sum() / (mask | e["mask"]).sum() >= 0.99, f"image {i}: mask differs"
            assert g["area"] == int(mask.sum())
        ids = out["label_map"][i]
        assert ids.shape == (h, w) and set(np.unique(ids)) <= set(range(len(got) + 1))
        if got:
            assert (ids == 1).sum() == rle_to_mask(got[0]["rle"], h, w).sum()  # the top score is painted whole


def test_semantic_resize_masks_come_back_at_input_size(tmp_path: Path) -> None:
    """With `resize`, the model sees the resized image and its logits are resized back before argmax."""
    import torchvision.transforms.v2.functional as TF

    from tests.varied import IMAGENET_MEAN, IMAGENET_STD

    model, ckpt = varied_lraspp_checkpoint(tmp_path / "m.pt")
    rw = resolve_weights(ModelSpec(task="semantic", arch="lraspp_mobilenet_v3_large", weights=str(ckpt), num_classes=4, resize=48))
    rng = np.random.default_rng(0)
    images = [np.clip(_gradient(h, w) + rng.integers(0, 60, size=(h, w, 3)), 0, 255).astype(np.uint8) for h, w in [(64, 96), (96, 64), (64, 96)]]
    expected = []
    for im in images:
        x = torch.from_numpy(im).permute(2, 0, 1).float()[None] / 255
        x = (TF.resize(x, [48], antialias=True) - IMAGENET_MEAN) / IMAGENET_STD
        with torch.inference_mode():
            logits = model(x)["out"]
        expected.append(torch.nn.functional.interpolate(logits, size=im.shape[:2], mode="bilinear", align_corners=False)[0].argmax(0).numpy())
    assert_varied_labels(expected)
    out = Predictor("semantic", rw, PredictSettings(batch_size=4))(_batch(images))
    for i, want in enumerate(expected):
        got = out["label_map"][i]
        assert got.shape == want.shape, f"image {i}: mask {got.shape}, input {want.shape}"
        assert (got == want).mean() >= 0.999, f"image {i}: mask differs"
        assert out["class_pixels"][i].sum() == got.size


def test_model_failure_on_one_image_is_an_error_row(tmp_path: Path) -> None:
    ckpt = save_checkpoint(lraspp(), tmp_path / "m.pt")
    pred = _semantic_predictor(ckpt)
    good = np.full((40, 40, 3), 100, np.uint8)
    bad = np.full((1, 1, 3), 100, np.uint8)  # too small for the backbone's batch norm at 1x1 after striding
    original = pred.predict_semantic

    def flaky(images: list[np.ndarray]) -> list:
        if any(im.shape[0] == 1 for im in images):
            raise RuntimeError("boom: cannot segment a 1x1 image")
        return original(images)

    pred.predict_semantic = flaky  # type: ignore[method-assign]
    out = pred(_batch([good, bad, good]))
    assert list(out["status"]) == ["ok", "error", "ok"]
    assert out["error_class"][1] == "model_failed"
    assert "/in/img1.png" in out["error"][1] and "boom" in out["error"][1]


ALL_ARCHS = [
    ("semantic", "fcn_resnet50"),
    ("semantic", "fcn_resnet101"),
    ("semantic", "deeplabv3_resnet50"),
    ("semantic", "deeplabv3_resnet101"),
    ("semantic", "deeplabv3_mobilenet_v3_large"),
    ("semantic", "lraspp_mobilenet_v3_large"),
    ("instance", "maskrcnn_resnet50_fpn"),
    ("instance", "maskrcnn_resnet50_fpn_v2"),
    ("semantic", "segbatch.models.small:unet_small"),
    ("instance", "segbatch.models.small:maskrcnn_small"),
]


@pytest.mark.parametrize(("task", "arch"), ALL_ARCHS)
def test_every_arch_builds_and_predicts_at_input_size(task: str, arch: str) -> None:
    spec = ModelSpec(task=task, arch=arch, weights="none", num_classes=5, score_threshold=0.0, resize=64 if task == "instance" else None)
    settings = PredictSettings(batch_size=2, score_threshold=0.0, max_detections=3, instance_png=True)
    pred = Predictor(task, resolve_weights(spec), settings)
    image = np.random.default_rng(0).integers(0, 256, size=(40, 52, 3), dtype=np.uint8)
    out = pred(_batch([image, image]))
    assert list(out["status"]) == ["ok", "ok"]
    assert out["label_map"][0].shape == (40, 52)
    if task == "semantic":
        assert out["label_map"][0].max() < 5 and out["class_pixels"][0].sum() == 40 * 52
    else:
        import json

        instances = json.loads(out["instances"][0])
        assert len(instances) <= 3 and all(0 <= i["label"] < 5 for i in instances)
        assert out["label_map"][0].max() <= len(instances)


def test_instances_are_cropped_encoded_and_painted_by_score() -> None:
    from segbatch.masks import rle_to_mask
    from segbatch.models.predictor import instances_from_output

    h, w = 20, 30
    probs = torch.zeros((2, 1, h, w))
    probs[0, 0, 2:10, 3:12] = 0.9  # lower score
    probs[1, 0, 6:15, 8:20] = 0.8  # higher score, overlaps the first
    probs[1, 0, 0, 29] = 0.7  # a stray pixel outside its box still belongs to the mask
    boxes = torch.tensor([[3.0, 2.0, 12.0, 10.0], [8.0, 6.0, 20.0, 15.0]])
    out, id_map = instances_from_output(
        boxes, torch.tensor([1, 2]), torch.tensor([0.6, 0.9]), probs, 0.5, h, w, with_map=True
    )
    assert [i["label"] for i in out] == [2, 1] and [round(i["score"], 2) for i in out] == [0.9, 0.6]
    assert out[0]["detector_bbox"] == [8.0, 6.0, 12.0, 9.0]  # the detector's box, as it gave it
    assert out[0]["bbox"] == [8.0, 0.0, 22.0, 15.0]  # the mask's own box: the stray pixel at (0, 29) included
    assert out[1]["bbox"] == [3.0, 2.0, 9.0, 8.0]
    for inst, k in zip(out, [1, 0]):
        mask = rle_to_mask(inst["rle"], h, w)
        assert (mask == (probs[k, 0] > 0.5).numpy()).all()
        assert inst["area"] == int(mask.sum())
    assert id_map[7, 9] == 1  # overlap: the higher score wins
    assert id_map[3, 4] == 2 and id_map[0, 29] == 1 and id_map[18, 0] == 0


def test_instances_to_labels_paints_the_most_confident_covering_detection() -> None:
    from segbatch.models.small import InstancesToLabels

    h, w = 4, 6
    left = torch.zeros(h, w)
    left[:, :3] = 0.9
    everywhere = torch.full((h, w), 0.8)
    faint = torch.full((h, w), 0.4)

    class FixedDetections(torch.nn.Module):  # stands in for a detector: known detections, any input
        def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
            return [
                {
                    "labels": torch.tensor([2, 1, 3, 1]),
                    "scores": torch.tensor([0.6, 0.9, 0.4, 0.7]),
                    "masks": torch.stack([everywhere, left, everywhere, faint])[:, None],
                }
                for _ in images
            ]

    model = InstancesToLabels(FixedDetections(), num_classes=4, score_threshold=0.5, mask_threshold=0.5)
    labels = model(torch.zeros(2, 3, h, w))["out"].argmax(1)
    expected = torch.full((h, w), 2)
    expected[:, :3] = 1  # class 1 (score 0.9) on top where its mask covers; class 3 scores below 0.5;
    assert torch.equal(labels[0], expected) and torch.equal(labels[1], expected)  # the 0.7 mask is too faint
    # Nothing detected: all background.
    model.score_threshold = 0.95
    assert int(model(torch.zeros(1, 3, h, w))["out"].argmax(1).max()) == 0


def test_read_weights_gives_resolve_weights_sha_without_torch(tmp_path: Path) -> None:
    import subprocess
    import sys

    from segbatch.models.source import read_weights

    ckpt = save_checkpoint(lraspp(), tmp_path / "m.pt")
    spec = ModelSpec(task="semantic", arch=ARCH, weights=str(ckpt), num_classes=4)
    assert read_weights(spec).sha256 == resolve_weights(spec).sha256
    assert read_weights(ModelSpec(task="semantic", arch=ARCH, num_classes=4)).sha256 == "none"
    builtin = read_weights(ModelSpec(task="instance", weights="builtin:shapes"))
    assert builtin.source == "builtin:shapes-instance.pt" and builtin.sha256 == resolve_weights(
        ModelSpec(task="instance", weights="builtin:shapes")
    ).sha256
    wrong = ModelSpec(task="semantic", arch=ARCH, weights=str(ckpt), num_classes=4, sha256="0" * 64)
    with pytest.raises(JobError, match="model.sha256"):
        read_weights(wrong)
    # In a fresh interpreter: reading and hashing never import torch.
    probe = (
        "import sys; from segbatch.models.source import read_weights; from segbatch.spec import ModelSpec; "
        f"read_weights(ModelSpec(task='semantic', arch='{ARCH}', weights='{ckpt}', num_classes=4)); "
        "print('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip() == "False"
