"""`compute.jpeg_decode: device`: the loader checks JPEG headers and leaves the decode to the actor.

On this CPU machine the actor's device is the CPU (torchvision's libjpeg-turbo decoder); on a GPU the
same code calls nvJPEG. Either way the result must be the loader path's: same pixels, same orientation,
same rows and error classes.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segbatch.load import _ORIENTATION, Loader, decode_image, inspect_jpeg
from segbatch.models import resolve_weights
from segbatch.models.predictor import Predictor, decode_jpegs, orient_chw
from segbatch.spec import LoadSettings, ModelSpec, PredictSettings
from tests.varied import assert_varied_labels, varied_lraspp_checkpoint


def _jpeg(array: np.ndarray, orientation: int = 1, mode: str | None = None) -> bytes:
    im = Image.fromarray(array)
    if mode:
        im = im.convert(mode)
    buf = io.BytesIO()
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    im.save(buf, "JPEG", quality=90, exif=exif.tobytes())
    return buf.getvalue()


def _scene(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) % 256], axis=2).astype(np.int64)
    return np.clip(base + rng.integers(-20, 20, (h, w, 3)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_matches_the_loaders(orientation: int) -> None:
    # The loader orients with Pillow transposes (segbatch.load._ORIENTATION); the device path must agree.
    array = _scene(5, 7, orientation)
    expected = np.asarray(Image.fromarray(array).transpose(_ORIENTATION[orientation])) if orientation > 1 else array
    got = orient_chw(torch.from_numpy(array).permute(2, 0, 1), orientation).permute(1, 2, 0).numpy()
    assert np.array_equal(got, expected)


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_device_decode_equals_loader_decode(orientation: int) -> None:
    data = _jpeg(_scene(40, 64, orientation), orientation)
    h, w, o = inspect_jpeg(data, "mem://a.jpg", 10**6)
    expected = decode_image(data, "mem://a.jpg", 10**6)
    assert (h, w, o) == (*expected.shape[:2], orientation)
    got = decode_jpegs([data], [o], torch.device("cpu"))[0].permute(1, 2, 0).numpy()
    assert got.shape == expected.shape
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1  # the same libjpeg-turbo, at most rounding


def _files(folder: Path) -> dict[str, bytes]:
    ok = _jpeg(_scene(40, 64, 1))
    files = {
        "a.jpg": ok,
        "b-rotated.jpg": _jpeg(_scene(40, 64, 2), orientation=6),
        "c-gray.jpg": _jpeg(_scene(40, 64, 3), mode="L"),
        "d-cmyk.jpg": _jpeg(_scene(40, 64, 4), mode="CMYK"),
        "e.png": b"",
        "f-truncated.jpg": ok[: len(ok) // 2],
        "g-same-size.jpg": _jpeg(_scene(40, 64, 5)),
    }
    buf = io.BytesIO()
    Image.fromarray(_scene(40, 64, 6)).save(buf, "PNG")
    files["e.png"] = buf.getvalue()
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return files


def _batch(folder: Path, names: list[str]) -> dict[str, np.ndarray]:
    uris = [str(folder / n) for n in names]
    return {
        "item_id": np.asarray([f"id{i}" for i in range(len(uris))], dtype=object),
        "uri": np.asarray(uris, dtype=object),
        "size": np.asarray([(folder / n).stat().st_size for n in names]),
        "plan_error": np.asarray([""] * len(uris), dtype=object),
    }


def test_loader_leaves_plain_jpegs_to_the_actor_and_the_rows_match(tmp_path: Path) -> None:
    files = _files(tmp_path)
    names = sorted(files)
    cpu = Loader()(_batch(tmp_path, names))
    dev = Loader(LoadSettings(jpeg_decode="device"))(_batch(tmp_path, names))
    left_to_actor = {n for n, j in zip(names, dev["jpeg"]) if len(j)}
    assert left_to_actor == {"a.jpg", "b-rotated.jpg", "c-gray.jpg", "g-same-size.jpg"}  # not CMYK, PNG, cut short
    for key in ("status", "error_class", "width", "height"):
        assert list(dev[key]) == list(cpu[key]), key
    assert dict(zip(names, dev["error_class"]))["f-truncated.jpg"] == "truncated"
    assert (dev["height"][names.index("b-rotated.jpg")], dev["width"][names.index("b-rotated.jpg")]) == (64, 40)

    _, ckpt = varied_lraspp_checkpoint(tmp_path / "lraspp.pt")
    rw = resolve_weights(ModelSpec(task="semantic", arch="lraspp_mobilenet_v3_large", weights=str(ckpt), num_classes=4))
    predictor = Predictor("semantic", rw, PredictSettings(batch_size=4))
    from_cpu, from_dev = predictor(cpu), predictor(dev)
    assert_varied_labels([m for m in from_cpu["label_map"] if m.size])
    assert "jpeg" not in from_dev and "image" not in from_dev
    assert list(from_dev["status"]) == list(from_cpu["status"])
    for name, a, b in zip(names, from_cpu["label_map"], from_dev["label_map"]):
        assert a.shape == b.shape, name
        if a.size:  # error rows carry an empty map
            assert (a == b).mean() >= 0.999, name
    assert sum(m.size > 0 for m in from_dev["label_map"]) == 6


def test_a_jpeg_the_device_decoder_rejects_becomes_an_error_row(tmp_path: Path) -> None:
    good = _jpeg(_scene(40, 64, 1))
    dht = good.index(b"\xff\xc4")  # a Huffman table: Pillow's header parse skips it, libjpeg's decode refuses it
    bad = good[: dht + 5] + b"\xff" * 16 + good[dht + 21 :]
    (tmp_path / "good.jpg").write_bytes(good)
    (tmp_path / "bad.jpg").write_bytes(bad)
    batch = Loader(LoadSettings(jpeg_decode="device"))(_batch(tmp_path, ["good.jpg", "bad.jpg"]))
    assert len(batch["jpeg"][1]) and list(batch["status"]) == ["ok", "ok"]  # the header looked fine
    rw = resolve_weights(ModelSpec(task="semantic", arch="segbatch.models.small:unet_small", num_classes=4))
    out = Predictor("semantic", rw, PredictSettings(batch_size=4))(batch)
    assert list(out["status"]) == ["ok", "error"]
    assert out["error_class"][1] == "truncated"
    assert out["error"][1].startswith(f"{tmp_path / 'bad.jpg'}: JPEG image data is truncated or corrupt (decoded on cpu)")
    assert "Bogus Huffman table" in out["error"][1]
    assert out["label_map"][0].shape == (40, 64)
    # The loader path names the same class for the same file.
    assert Loader()(_batch(tmp_path, ["bad.jpg"]))["error_class"][0] == "truncated"


def test_a_decoded_size_that_differs_from_the_header_is_an_error_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A device decode that disagrees with the header (here: orientation lost) never gives a mask of the
    wrong size: the batch path checks every size, and the file becomes an error row."""
    from segbatch.models import predictor as predictor_module

    (tmp_path / "a.jpg").write_bytes(_jpeg(_scene(40, 64, 1)))
    (tmp_path / "b.jpg").write_bytes(_jpeg(_scene(40, 64, 2), orientation=6))
    batch = Loader(LoadSettings(jpeg_decode="device"))(_batch(tmp_path, ["a.jpg", "b.jpg"]))
    real = predictor_module.decode_jpegs
    monkeypatch.setattr(predictor_module, "decode_jpegs", lambda data, orientations, device: real(data, [1] * len(data), device))
    rw = resolve_weights(ModelSpec(task="semantic", arch="segbatch.models.small:unet_small", num_classes=4))
    out = Predictor("semantic", rw, PredictSettings(batch_size=4))(batch)
    assert list(out["status"]) == ["ok", "error"] and out["error_class"][1] == "truncated"
    assert "decoded size (40, 64) differs from the header's (64, 40)" in out["error"][1]
    assert out["label_map"][0].shape == (40, 64)
