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
    ckpt = save_checkpoint(lraspp(), tmp_path / "m.pt")
    pred = _semantic_predictor(ckpt)
    rng = np.random.default_rng(0)
    sizes = [(64, 96), (96, 64), (64, 96), (50, 70), (64, 96)]
    images = [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for h, w in sizes]
    images.insert(2, np.zeros((0, 0, 3), np.uint8))
    status = ["ok", "ok", "error", "ok", "ok", "ok"]
    out = pred(_batch(images, status))
    assert "image" not in out
    assert out["label_map"][2].size == 0 and out["status"][2] == "error"
    for i, im in enumerate(images):
        if status[i] != "ok":
            continue
        alone = pred(_batch([im]))["label_map"][0]
        assert out["label_map"][i].shape == im.shape[:2] and out["label_map"][i].dtype == np.uint8
        assert (out["label_map"][i] == alone).mean() >= 0.999
        assert out["class_pixels"][i].sum() == im.shape[0] * im.shape[1]
        assert list(out["class_pixels"][i]) == list(np.bincount(alone.ravel(), minlength=4))


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
    assert out[0]["bbox"] == [8.0, 6.0, 12.0, 9.0]
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


def test_weights_digest_is_resolve_weights_sha_without_building(tmp_path: Path) -> None:
    from segbatch.models.weights import weights_digest

    ckpt = save_checkpoint(lraspp(), tmp_path / "m.pt")
    spec = ModelSpec(task="semantic", arch=ARCH, weights=str(ckpt), num_classes=4)
    assert weights_digest(spec) == resolve_weights(spec).sha256
    assert weights_digest(ModelSpec(task="semantic", arch=ARCH, num_classes=4)) == "none"
    wrong = ModelSpec(task="semantic", arch=ARCH, weights=str(ckpt), num_classes=4, sha256="0" * 64)
    with pytest.raises(JobError, match="model.sha256"):
        weights_digest(wrong)
