"""The load stage without Ray: colour rules, orientation, frames, formats, and a corpus of broken files."""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tests.corpus import CORPUS_MAX_BYTES, CORPUS_NAMES, CorpusFile, png_bytes, write_corpus
from PIL import Image, ImageFile

from segbatch import load
from segbatch.errors import ERROR_CLASSES, ItemError
from segbatch.load import EMPTY_IMAGE, Loader, decode_image, to_rgb
from segbatch.spec import LoadSettings

MAX_PIXELS = 178_956_970


def _save(im: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _decode(data: bytes, uri: str = "mem://x.png", max_pixels: int = MAX_PIXELS) -> np.ndarray:
    return decode_image(data, uri, max_pixels)


def _error(data: bytes, uri: str = "mem://x.png", max_pixels: int = MAX_PIXELS) -> ItemError:
    with pytest.raises(ItemError) as info:
        decode_image(data, uri, max_pixels)
    assert info.value.message.startswith(f"{uri}: ")
    return info.value


def _gray(values: list[list[int]]) -> np.ndarray:
    """The RGB array of a gray image: each value replicated over 3 channels."""
    return np.repeat(np.asarray(values, dtype=np.uint8)[:, :, None], 3, axis=2)


def _rows(tmp_path: Path, files: dict[str, bytes]) -> dict[str, np.ndarray]:
    """Write files and make the input batch a listing would give for them."""
    uris = []
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        uris.append(str(tmp_path / name))
    return {
        "uri": np.asarray(uris, dtype=object),
        "size": np.asarray([len(d) for d in files.values()], dtype=np.int64),
    }


# ---------------------------------------------------------------------------------------------------------------------
# Colour conversion: each mode, with the pixel values the module docstring promises.


def test_gray_l_is_replicated() -> None:
    im = Image.fromarray(np.array([[0, 7, 255]], dtype=np.uint8))
    assert im.mode == "L"
    np.testing.assert_array_equal(to_rgb(im), _gray([[0, 7, 255]]))


def test_rgba_drops_alpha_without_compositing() -> None:
    arr = np.array([[[10, 20, 30, 0], [200, 100, 50, 128], [1, 2, 3, 255]]], dtype=np.uint8)
    out = _decode(_save(Image.fromarray(arr, "RGBA"), "PNG"))
    np.testing.assert_array_equal(out, arr[:, :, :3])
    np.testing.assert_array_equal(out, np.asarray(Image.fromarray(arr, "RGBA").convert("RGB")))


def test_gray_alpha_drops_alpha() -> None:
    im = Image.new("LA", (2, 2), (90, 10))
    out = _decode(_save(im, "PNG"))
    np.testing.assert_array_equal(out, _gray([[90, 90], [90, 90]]))


def _palette(transparency: int | None) -> Image.Image:
    im = Image.fromarray(np.array([[0, 1, 2]], dtype=np.uint8), "P")
    im.putpalette([0, 0, 0, 200, 10, 10, 1, 2, 250] + [0] * 759)
    if transparency is not None:
        im.info["transparency"] = transparency
    return im


@pytest.mark.parametrize("transparency", [None, 1])
def test_palette_is_looked_up_and_transparency_dropped(transparency: int | None) -> None:
    im = _palette(transparency)
    kwargs = {} if transparency is None else {"transparency": transparency}
    data = _save(im, "PNG", **kwargs)
    assert ("transparency" in Image.open(io.BytesIO(data)).info) is (transparency is not None)
    out = _decode(data)
    # the transparent entry (index 1) keeps its palette colour
    np.testing.assert_array_equal(out, np.array([[[0, 0, 0], [200, 10, 10], [1, 2, 250]]], dtype=np.uint8))


def test_palette_with_transparency_from_gif() -> None:
    out = _decode(_save(_palette(2), "GIF", transparency=2))
    np.testing.assert_array_equal(out, np.array([[[0, 0, 0], [200, 10, 10], [1, 2, 250]]], dtype=np.uint8))


def test_cmyk_is_pils_naive_inversion() -> None:
    assert to_rgb(Image.new("CMYK", (1, 1), (10, 20, 30, 40)))[0, 0].tolist() == [207, 198, 190]
    arr = np.random.default_rng(0).integers(0, 256, (5, 7, 4), dtype=np.uint8)
    im = Image.fromarray(arr, "CMYK")
    expected = np.asarray(im.convert("RGB"))
    np.testing.assert_array_equal(to_rgb(im), expected)
    c, m, y, k = (arr[:, :, i].astype(float) for i in range(4))
    formula = np.stack([(255 - c) * (255 - k) / 255, (255 - m) * (255 - k) / 255, (255 - y) * (255 - k) / 255], 2)
    assert np.abs(expected - formula).max() <= 1
    # through a CMYK TIFF file, losslessly
    np.testing.assert_array_equal(_decode(_save(im, "TIFF")), expected)


VALUES_16 = [[0, 257, 32768, 65535]]
EXPECTED_16 = [[0, 1, 128, 255]]  # v * 255 / 65535, rounded


def test_16bit_gray_png_is_scaled_not_clipped() -> None:
    data = _save(Image.fromarray(np.array(VALUES_16, dtype=np.uint16)), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    np.testing.assert_array_equal(_decode(data), _gray(EXPECTED_16))


@pytest.mark.parametrize(("mode", "dtype"), [("I;16", "<u2"), ("I;16B", ">u2")])
def test_16bit_gray_tiff_is_scaled(mode: str, dtype: str) -> None:
    im = Image.frombytes(mode, (4, 1), np.array(VALUES_16, dtype=dtype).tobytes())
    data = _save(im, "TIFF")
    assert Image.open(io.BytesIO(data)).mode == mode
    np.testing.assert_array_equal(_decode(data), _gray(EXPECTED_16))


def test_32bit_int_gray_is_clipped_then_scaled() -> None:
    im = Image.fromarray(np.array([[-5, 0, 32768, 65535, 100_000]], dtype=np.int32))
    assert im.mode == "I"
    np.testing.assert_array_equal(to_rgb(im), _gray([[0, 0, 128, 255, 255]]))
    np.testing.assert_array_equal(_decode(_save(im, "TIFF")), _gray([[0, 0, 128, 255, 255]]))


def test_16bit_rgb_png_keeps_the_high_byte() -> None:
    row = b"\x00" + b"".join(int(v).to_bytes(2, "big") for v in (0x8000, 0xFFFF, 0x0101, 0x80FF, 0x00FF, 0))
    out = _decode(png_bytes(2, 1, 16, 2, row))
    assert out.tolist() == [[[128, 255, 1], [128, 0, 0]]]


def test_1bit_is_0_or_255() -> None:
    im = Image.fromarray(np.array([[True, False, True]]))
    assert im.mode == "1"
    np.testing.assert_array_equal(_decode(_save(im, "PNG")), _gray([[255, 0, 255]]))


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([[0.0, 0.5, 1.0, 0.25]], [[0, 128, 255, 64]]),  # maximum ≤ 1: a 0..1 image
        ([[0.0, 100.0, 300.0, -4.0]], [[0, 100, 255, 0]]),  # maximum > 1: a 0..255 image, clipped
        ([[np.nan, 0.5, np.inf, -np.inf]], [[0, 128, 255, 0]]),  # finite maximum 0.5; NaN → 0; ±inf clipped
    ],
)
def test_float_gray(values: list[list[float]], expected: list[list[int]]) -> None:
    im = Image.fromarray(np.array(values, dtype=np.float32))
    assert im.mode == "F"
    np.testing.assert_array_equal(to_rgb(im), _gray(expected))
    np.testing.assert_array_equal(_decode(_save(im, "TIFF")), _gray(expected))


def test_float_all_nan_is_black() -> None:
    im = Image.fromarray(np.full((2, 2), np.nan, dtype=np.float32))
    np.testing.assert_array_equal(to_rgb(im), np.zeros((2, 2, 3), np.uint8))


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA", "RGBX", "P", "PA", "CMYK", "YCbCr", "HSV", "LAB", "1"])
def test_other_modes_are_pils_convert(mode: str) -> None:
    rng = np.random.default_rng(1)
    bands = Image.getmodebands(mode)
    raw = rng.integers(0, 256, (3, 5, bands), dtype=np.uint8)
    im = Image.frombytes(mode, (5, 3), raw.tobytes()) if mode != "1" else Image.fromarray(raw[:, :, 0] > 127)
    if mode in ("P", "PA"):
        im.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tobytes())
    out = to_rgb(im)
    assert out.dtype == np.uint8 and out.shape == (3, 5, 3)
    np.testing.assert_array_equal(out, np.asarray(im.convert("RGB")))


def test_unconvertible_mode_is_unsupported(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError):
        to_rgb(Image.new("La", (2, 2)))

    def refuse(im: Image.Image) -> np.ndarray:
        raise ValueError(f"conversion from {im.mode} to RGB not supported")

    monkeypatch.setattr(load, "to_rgb", refuse)
    err = _error(_save(Image.new("L", (2, 2)), "PNG"), "s3://b/odd.png")
    assert err.error_class == "unsupported"
    assert "colour mode L" in err.message


# ---------------------------------------------------------------------------------------------------------------------
# EXIF orientation


QUADRANTS = {  # 16 wide x 8 high: four 8x4 blocks
    "tl": (255, 0, 0),
    "tr": (0, 255, 0),
    "bl": (0, 0, 255),
    "br": (255, 255, 255),
}


def _quadrant_image() -> np.ndarray:
    arr = np.zeros((8, 16, 3), dtype=np.uint8)
    arr[:4, :8], arr[:4, 8:] = QUADRANTS["tl"], QUADRANTS["tr"]
    arr[4:, :8], arr[4:, 8:] = QUADRANTS["bl"], QUADRANTS["br"]
    return arr


def _with_orientation(arr: np.ndarray, orientation: int, fmt: str) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    kwargs: dict[str, Any] = {"quality": 95} if fmt == "JPEG" else {}
    return _save(Image.fromarray(arr), fmt, exif=exif.tobytes(), **kwargs)


def _corners(arr: np.ndarray) -> dict[str, tuple[int, ...]]:
    h, w = arr.shape[:2]
    at = {"tl": (1, 1), "tr": (1, w - 2), "bl": (h - 2, 1), "br": (h - 2, w - 2)}
    return {name: tuple(int(v) for v in arr[y, x]) for name, (y, x) in at.items()}


@pytest.mark.parametrize(
    ("orientation", "corners"),
    [
        # 6: the camera was turned clockwise; shown rotated 90° clockwise: the stored left column becomes the top row
        (6, {"tl": QUADRANTS["bl"], "tr": QUADRANTS["tl"], "bl": QUADRANTS["br"], "br": QUADRANTS["tr"]}),
        # 8: rotated 90° counter-clockwise
        (8, {"tl": QUADRANTS["tr"], "tr": QUADRANTS["br"], "bl": QUADRANTS["tl"], "br": QUADRANTS["bl"]}),
        (3, {"tl": QUADRANTS["br"], "tr": QUADRANTS["bl"], "bl": QUADRANTS["tr"], "br": QUADRANTS["tl"]}),
        (1, QUADRANTS),
    ],
)
def test_exif_orientation_jpeg(orientation: int, corners: dict[str, tuple[int, int, int]]) -> None:
    out = _decode(_with_orientation(_quadrant_image(), orientation, "JPEG"), "mem://photo.jpg")
    assert out.shape == ((16, 8, 3) if orientation in (6, 8) else (8, 16, 3))
    got = _corners(out)
    for name, colour in corners.items():
        assert np.abs(np.subtract(got[name], colour)).max() <= 8, (name, got[name], colour)


@pytest.mark.parametrize(
    ("orientation", "upright"),
    [
        (1, lambda a: a),
        (2, lambda a: a[:, ::-1]),
        (3, lambda a: a[::-1, ::-1]),
        (4, lambda a: a[::-1, :]),
        (5, lambda a: a.transpose(1, 0, 2)),
        (6, lambda a: np.rot90(a, -1)),
        (7, lambda a: np.rot90(a, 2).transpose(1, 0, 2)),
        (8, lambda a: np.rot90(a, 1)),
    ],
)
def test_exif_orientation_all_eight_lossless(orientation: int, upright: Any) -> None:
    arr = np.random.default_rng(orientation).integers(0, 256, (3, 5, 3), dtype=np.uint8)
    out = _decode(_with_orientation(arr, orientation, "PNG"))
    np.testing.assert_array_equal(out, upright(arr))


def test_exif_orientation_of_a_16bit_image() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _save(Image.fromarray(np.array(VALUES_16, dtype=np.uint16)), "PNG", exif=exif.tobytes())
    np.testing.assert_array_equal(_decode(data), _gray(EXPECTED_16).transpose(1, 0, 2))


@pytest.mark.parametrize(
    "blob", [b"Exif\x00\x00garbage-not-a-tiff-header", b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff"]
)
def test_unreadable_exif_keeps_the_pixels(blob: bytes) -> None:
    arr = _quadrant_image()
    out = _decode(_save(Image.fromarray(arr), "JPEG", exif=blob, quality=95))
    assert out.shape == arr.shape


# ---------------------------------------------------------------------------------------------------------------------
# Frames, formats, sizes


def test_animated_gif_gives_the_first_frame() -> None:
    frames = []
    for i in range(3):
        f = Image.new("P", (6, 4), i)
        f.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
        frames.append(f)
    data = _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    out = _decode(data)
    assert out.shape == (4, 6, 3)
    assert (out == (255, 0, 0)).all()


def test_multipage_tiff_gives_the_first_page() -> None:
    first, second = Image.new("RGB", (6, 4), (255, 0, 0)), Image.new("L", (3, 9), 200)
    data = _save(first, "TIFF", save_all=True, append_images=[second])
    assert Image.open(io.BytesIO(data)).n_frames == 2
    out = _decode(data)
    assert out.shape == (4, 6, 3)
    assert (out == (255, 0, 0)).all()


@pytest.mark.parametrize(("fmt", "kwargs"), [("WEBP", {"lossless": True}), ("BMP", {}), ("TIFF", {}), ("PNG", {})])
def test_lossless_formats_round_trip(fmt: str, kwargs: dict[str, Any]) -> None:
    arr = np.random.default_rng(2).integers(0, 256, (5, 9, 3), dtype=np.uint8)
    np.testing.assert_array_equal(_decode(_save(Image.fromarray(arr), fmt, **kwargs)), arr)


def test_content_decides_not_the_extension() -> None:
    arr = np.random.default_rng(3).integers(0, 256, (6, 2, 3), dtype=np.uint8)
    np.testing.assert_array_equal(_decode(_save(Image.fromarray(arr), "PNG"), "s3://b/really-a-png.jpg"), arr)
    jpeg_named_png = _decode(_save(Image.new("RGB", (4, 4), (0, 128, 0)), "JPEG"), "s3://b/really-a-jpeg.png")
    assert jpeg_named_png.shape == (4, 4, 3)


@pytest.mark.parametrize(("w", "h"), [(4000, 3), (3, 4000), (1, 1)])
def test_very_wide_tall_and_tiny(w: int, h: int) -> None:
    arr = np.random.default_rng(4).integers(0, 256, (h, w, 3), dtype=np.uint8)
    out = _decode(_save(Image.fromarray(arr), "PNG"))
    assert out.shape == (h, w, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, arr)


# ---------------------------------------------------------------------------------------------------------------------
# Size limits: refused before decoding


def test_max_pixels_is_checked_on_the_header() -> None:
    data = _save(Image.new("RGB", (100, 100)), "PNG")
    assert _decode(data, max_pixels=10_000).shape == (100, 100, 3)
    err = _error(data, "s3://b/big.png", max_pixels=9_999)
    assert err.error_class == "too_large"
    assert "100x100 = 10000 pixels exceeds input.max_pixels=9999" in err.message


@pytest.mark.parametrize(
    ("w", "h", "max_pixels"),
    [
        (30000, 30000, MAX_PIXELS),  # PIL's own guard fires at the same limit
        (65535, 65535, 10**9),  # max_pixels above PIL's limit: PIL's guard is raised, still refuses
        (5000, 10, 40_000),  # a small limit: our check after Image.open refuses
    ],
)
def test_decompression_bomb_is_never_decoded(monkeypatch: pytest.MonkeyPatch, w: int, h: int, max_pixels: int) -> None:
    """A header claiming more than max_pixels is refused without loading a single pixel."""
    loads: list[object] = []
    real_load = ImageFile.ImageFile.load

    def spy(self: ImageFile.ImageFile) -> Any:
        loads.append(self)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    data = png_bytes(w, h, 8, 0, b"\x00" * 64)  # tiny file, huge claim
    err = _error(data, "s3://b/bomb.png", max_pixels=max_pixels)
    assert err.error_class == "too_large"
    assert "refused before decoding" in err.message and f"input.max_pixels={max_pixels}" in err.message
    assert loads == []
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # PIL's default, restored


def test_bomb_claim_in_a_jpeg_header() -> None:
    data = bytearray(_save(Image.new("RGB", (16, 16)), "JPEG"))
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = (60000).to_bytes(2, "big") * 2
    err = _error(bytes(data), "s3://b/bomb.jpg")
    assert err.error_class == "too_large"


def test_max_pixels_above_pils_own_limit_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    """PIL refuses above 2 * Image.MAX_IMAGE_PIXELS by itself; a larger max_pixels must still decode."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL alone would refuse > 2000 pixels
    data = _save(Image.new("RGB", (100, 100), (1, 2, 3)), "PNG")
    assert _decode(data, max_pixels=20_000).shape == (100, 100, 3)
    assert Image.MAX_IMAGE_PIXELS == 1000  # restored
    assert _error(data, max_pixels=5_000).error_class == "too_large"
    assert Image.MAX_IMAGE_PIXELS == 1000


def test_pils_limit_still_guards_below_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    err = _error(_save(Image.new("RGB", (100, 100)), "PNG"), "s3://b/a.png", max_pixels=2000)
    assert err.error_class == "too_large"


# ---------------------------------------------------------------------------------------------------------------------
# The Loader: columns, byte limits, fetch errors


def test_loader_columns_and_passthrough(tmp_path: Path) -> None:
    batch = _rows(
        tmp_path,
        {
            "a.png": _save(Image.new("RGB", (3, 2), (1, 2, 3)), "PNG"),
            "b.png": b"nope",
            "c.jpg": _save(Image.new("L", (5, 4)), "JPEG"),
        },
    )
    batch["item_id"] = np.asarray(["i0", "i1", "i2"], dtype=object)
    batch["plan_error"] = np.asarray(["", "", ""], dtype=object)
    out = Loader()(batch)
    assert out["item_id"].tolist() == ["i0", "i1", "i2"]
    assert out["uri"].tolist() == batch["uri"].tolist()
    assert out["status"].tolist() == ["ok", "error", "ok"]
    assert out["error_class"].tolist() == ["", "not_an_image", ""]
    assert out["error"][0] == "" and out["error"][1].startswith(batch["uri"][1] + ": ")
    assert out["width"].tolist() == [3, 0, 5] and out["height"].tolist() == [2, 0, 4]
    assert out["width"].dtype == np.int32 and out["height"].dtype == np.int32
    assert out["image"].dtype == object and out["image"].shape == (3,)
    assert out["image"][0].shape == (2, 3, 3) and out["image"][0].dtype == np.uint8
    assert out["image"][0][0, 0].tolist() == [1, 2, 3]
    assert out["image"][1] is EMPTY_IMAGE
    assert out["image"][2].shape == (4, 5, 3)


def test_loader_same_shapes_stay_an_object_array(tmp_path: Path) -> None:
    png = _save(Image.new("RGB", (3, 2)), "PNG")
    out = Loader()(_rows(tmp_path, {"a.png": png, "b.png": png}))
    assert out["image"].dtype == object and out["image"].shape == (2,)
    assert "load_seconds" not in out  # no column for any one stage's own use


def test_loader_empty_batch() -> None:
    out = Loader()({"uri": np.asarray([], dtype=object), "size": np.asarray([], dtype=np.int64)})
    assert out["image"].shape == (0,) and out["status"].tolist() == [] and out["error"].shape == (0,)


def test_listed_size_over_max_bytes_is_refused_before_fetching(tmp_path: Path) -> None:
    uri = str(tmp_path / "does-not-exist.png")  # fetching it would say "unreadable"
    out = Loader(LoadSettings(max_bytes=1000))({"uri": np.asarray([uri], dtype=object), "size": np.asarray([10**12])})
    assert out["error_class"].tolist() == ["too_large"]
    assert out["error"][0] == f"{uri}: 1000000000000 bytes exceeds input.max_bytes=1000; refused before fetching"


def test_unknown_or_stale_size_is_bounded_while_fetching(tmp_path: Path) -> None:
    data = _save(Image.fromarray(np.random.default_rng(5).integers(0, 256, (40, 40, 3), dtype=np.uint8)), "PNG")
    batch = _rows(tmp_path, {"a.png": data})
    batch["size"] = np.asarray([0])  # a manifest without sizes
    out = Loader(LoadSettings(max_bytes=len(data) - 1))(batch)
    assert out["error_class"].tolist() == ["too_large"]
    assert "more than input.max_bytes" in out["error"][0] and out["error"][0].startswith(batch["uri"][0])
    assert Loader(LoadSettings(max_bytes=len(data)))(batch)["status"].tolist() == ["ok"]


def test_plan_error_becomes_unsafe_key_without_fetching(tmp_path: Path) -> None:
    batch = {
        "uri": np.asarray([str(tmp_path / "gone.png"), str(tmp_path / "also-gone.png")], dtype=object),
        "size": np.asarray([10, 10]),
        "plan_error": np.asarray(["/x/../../etc: key escapes the output prefix", None], dtype=object),
    }
    out = Loader()(batch)
    assert out["error_class"].tolist() == ["unsafe_key", "unreadable"]
    assert out["error"][0] == "/x/../../etc: key escapes the output prefix"


def test_missing_object_is_unreadable(tmp_path: Path) -> None:
    uri = str(tmp_path / "nothing.png")
    out = Loader()({"uri": np.asarray([uri], dtype=object), "size": np.asarray([5])})
    assert out["error_class"].tolist() == ["unreadable"]
    assert out["error"][0] == f"{uri}: object not found"


@contextmanager
def _unprivileged() -> Iterator[None]:
    """Run the body as `nobody` when the suite runs as root (CI does): root reads any file."""
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)


def test_unreadable_permission() -> None:
    folder = Path(tempfile.mkdtemp(prefix="segbatch-perm-"))  # outside pytest's root-only tmp tree
    try:
        folder.chmod(0o755)
        batch = _rows(folder, {"locked.png": _save(Image.new("RGB", (2, 2)), "PNG"), "open.png": _save(Image.new("RGB", (2, 2)), "PNG")})
        (folder / "locked.png").chmod(0)
        with _unprivileged():
            out = Loader()(batch)
    finally:
        shutil.rmtree(folder)
    assert out["status"].tolist() == ["error", "ok"] and out["error_class"][0] == "unreadable"
    assert out["error"][0].startswith(f"{folder / 'locked.png'}: permission denied")


def test_path_under_a_file_is_unreadable(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(_save(Image.new("RGB", (2, 2)), "PNG"))
    uri = str(tmp_path / "a.png" / "inner.png")  # the parent is a file: fails for root too
    out = Loader()({"uri": np.asarray([uri], dtype=object), "size": np.asarray([5])})
    assert out["status"].tolist() == ["error"] and out["error_class"].tolist() == ["unreadable"]
    assert out["error"][0].startswith(f"{uri}: cannot read: NotADirectoryError")


def test_file_uri(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(_save(Image.new("RGB", (2, 3)), "PNG"))
    out = Loader()({"uri": np.asarray([f"file://{tmp_path}/a.png"], dtype=object), "size": np.asarray([70])})
    assert out["status"].tolist() == ["ok"] and out["image"][0].shape == (3, 2, 3)


# ---------------------------------------------------------------------------------------------------------------------
# The corpus: every file ends in exactly one row with the expected outcome.

#: What each error message must say beyond the file's URI.
PROBLEM_WORDS = {
    "unreadable": ("not found", "cannot read", "permission"),
    "not_an_image": ("not a recognised image format", "empty file"),
    "truncated": ("truncated or corrupt",),
    "too_large": ("max_pixels", "max_bytes"),
    "unsupported": ("not supported", "cannot decode", "cannot convert"),
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, CorpusFile]:
    return {f.name: f for f in write_corpus(tmp_path_factory.mktemp("corpus"))}


def _check_row(out: dict[str, Any], i: int, f: CorpusFile) -> None:
    assert out["uri"][i] == f.uri
    assert out["status"][i] == f.status, (f.name, out["error_class"][i], out["error"][i])
    if f.status == "ok":
        assert out["error_class"][i] == "" and out["error"][i] == ""
        image = out["image"][i]
        assert image.dtype == np.uint8 and image.shape == f.shape
        assert (out["height"][i], out["width"][i]) == f.shape[:2]
    else:
        assert out["error_class"][i] == f.error_class, (f.name, out["error"][i])
        assert out["error_class"][i] in ERROR_CLASSES
        message = out["error"][i]
        assert message.startswith(f"{f.uri}: ") and len(message) > len(f.uri) + 10
        assert any(word in message for word in PROBLEM_WORDS[f.error_class]), message
        assert out["image"][i].shape == (0, 0, 3)
        assert out["width"][i] == 0 and out["height"][i] == 0


def test_corpus_is_big_enough(corpus: dict[str, CorpusFile]) -> None:
    assert len(corpus) >= 15
    outcomes = {f.error_class or "ok" for f in corpus.values()}
    assert outcomes == {"ok", "unreadable", "not_an_image", "truncated", "too_large", "unsupported"}
    assert corpus["oversize.png"].size > CORPUS_MAX_BYTES


@pytest.mark.parametrize("name", CORPUS_NAMES)
def test_corpus_file(corpus: dict[str, CorpusFile], name: str) -> None:
    f = corpus[name]
    batch = {"uri": np.asarray([f.uri], dtype=object), "size": np.asarray([f.size], dtype=np.int64)}
    _check_row(Loader(LoadSettings(max_bytes=CORPUS_MAX_BYTES))(batch), 0, f)


def test_corpus_as_one_batch(corpus: dict[str, CorpusFile]) -> None:
    files = list(corpus.values())
    batch = {
        "uri": np.asarray([f.uri for f in files], dtype=object),
        "size": np.asarray([f.size for f in files], dtype=np.int64),
        "item_id": np.arange(len(files)),
    }
    out = Loader(LoadSettings(max_bytes=CORPUS_MAX_BYTES, fetch_concurrency=4))(batch)
    assert all(len(v) == len(files) for v in out.values())
    assert out["item_id"].tolist() == list(range(len(files)))
    for i, f in enumerate(files):
        _check_row(out, i, f)


def test_corpus_pixels(corpus: dict[str, CorpusFile]) -> None:
    """Spot-check the values of the awkward-but-valid corpus files."""

    def image(name: str) -> np.ndarray:
        return decode_image(Path(corpus[name].uri).read_bytes(), corpus[name].uri, MAX_PIXELS)

    assert image("gray16.png")[0, :, 0].tolist() == [0, 128, 255]
    assert (image("gray16.tif") == 156).all()  # 40000 * 255 / 65535 = 155.6
    assert image("rgb16.png")[0, 0].tolist() == [128, 255, 1]
    assert (image("float.tif") == 128).all()
    assert (image("bilevel.png") == 255).all()
    assert (image("palette_transparent.png") == (200, 10, 10)).all()
    assert (image("gray_alpha.png") == 90).all()
    assert (image("rgba.png") == (1, 2, 3)).all()
    assert (image("animated.gif") == (255, 0, 0)).all()
    assert (image("multipage.tif") == (255, 0, 0)).all()
    assert (image("wide.png") == (5, 6, 7)).all() and (image("tiny.png") == (5, 6, 7)).all()
    cmyk = Image.new("CMYK", (1, 1), (10, 20, 30, 40)).convert("RGB").getpixel((0, 0))
    assert np.abs(image("cmyk.jpg").astype(int) - cmyk).max() <= 3  # JPEG is lossy


def _tiff(planes: list[np.ndarray], *, planar: bool, photometric: int = 2) -> bytes:
    """A minimal little-endian TIFF (one strip per plane, uncompressed), written by hand: Pillow cannot
    write planar TIFFs, and the point is what Pillow makes of a real one."""
    import struct

    h, w = planes[0].shape
    n = len(planes)
    bits = planes[0].dtype.itemsize * 8
    sample_format = {"u": 1, "i": 2, "f": 3}[planes[0].dtype.kind]
    if planar:
        strips = [p.tobytes() for p in planes]
    else:
        strips = [np.stack(planes, axis=-1).tobytes()]
    body = b"".join(strips)
    offsets, at = [], 8
    for strip in strips:
        offsets.append(at)
        at += len(strip)
    extra_data = b""

    def array(kind: str, values: list[int]) -> int:  # stored after the pixels; returns its offset
        nonlocal extra_data
        where = 8 + len(body) + len(extra_data)
        extra_data += struct.pack(f"<{len(values)}{kind}", *values)
        return where

    SHORT, LONG = 3, 4
    tags = [
        (256, SHORT, [w]),
        (257, SHORT, [h]),
        (258, SHORT, [bits] * n),
        (259, SHORT, [1]),
        (262, SHORT, [photometric]),
        (273, LONG, offsets),
        (277, SHORT, [n]),
        (278, SHORT, [h]),
        (279, LONG, [len(s) for s in strips]),
        (284, SHORT, [2 if planar else 1]),
        (339, SHORT, [sample_format] * n),
    ]
    entries = []
    for tag, kind, values in tags:
        fmt = "H" if kind == SHORT else "I"
        if len(values) * (2 if kind == SHORT else 4) <= 4:
            inline = struct.pack(f"<{len(values)}{fmt}", *values).ljust(4, b"\0")
        else:
            inline = struct.pack("<I", array(fmt, values))
        entries.append(struct.pack("<HHI", tag, kind, len(values)) + inline)
    ifd_at = 8 + len(body) + len(extra_data)
    ifd = struct.pack("<H", len(entries)) + b"".join(entries) + struct.pack("<I", 0)
    return b"II*\0" + struct.pack("<I", ifd_at) + body + extra_data + ifd


def test_planar_rgb_tiff_pillow_decodes() -> None:
    """The hand-written TIFF is sound: as planar 8-bit RGB (which Pillow reads) it decodes exactly."""
    rng = np.random.default_rng(5)
    planes = [rng.integers(0, 256, (6, 7), dtype=np.uint8) for _ in range(3)]
    out = decode_image(_tiff(planes, planar=True), "mem://planar8.tif", max_pixels=1000)
    assert np.array_equal(out, np.stack(planes, axis=-1))


@pytest.mark.parametrize("planar", [True, False])
def test_tiff_layout_pillow_cannot_decode_is_named_as_such(planar: bool) -> None:
    """Planar RGB of 32-bit floats: Pillow has no pixel mode for it. That is `unsupported` and says so,
    not "header is damaged or cut short"."""
    planes = [np.full((4, 5), v, dtype=np.float32) for v in (0.1, 0.5, 0.9)]
    uri = "mem://planar-float.tif"
    with pytest.raises(ItemError) as err:
        decode_image(_tiff(planes, planar=planar), uri, max_pixels=1000)
    assert err.value.error_class == "unsupported"
    message = err.value.message
    assert "damaged" not in message and "cut short" not in message
    layout = "3 RGB samples of 32-bit float"
    if planar:
        assert message == (
            f"{uri}: TIFF layout Pillow cannot decode (planar configuration (separate planes), {layout}: unknown "
            "pixel mode); convert it to a contiguous (chunky) 8- or 16-bit RGB TIFF"
        )
    else:
        assert message == (
            f"{uri}: TIFF layout Pillow cannot decode ({layout}: unknown pixel mode); convert it to an 8- or 16-bit "
            "RGB or grayscale TIFF"
        )
    assert any(word in message for word in PROBLEM_WORDS["unsupported"])

