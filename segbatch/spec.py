"""Job specification: YAML → strict pydantic models, with `--set` overrides.

Every key is typed and described; unknown keys (with "did you mean" for a close known key), missing
keys and bad values are reported together on one line naming the file, each key and value (see
:class:`SpecError`), before any Ray work starts.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from segbatch.models.archs import INSTANCE_ARCHS, SEMANTIC_ARCHS

__all__ = [
    "ComputeSpec",
    "InputSpec",
    "JobSpec",
    "LayerSpec",
    "LoadSettings",
    "ModelSpec",
    "PredictSettings",
    "OutputSpec",
    "RunSpec",
    "SceneSettings",
    "ScaleSpec",
    "SpecError",
    "TilingSpec",
    "add_override_argument",
    "load_job",
    "parse_job",
    "SEMANTIC_ARCHS",
    "INSTANCE_ARCHS",
    "IMAGE_EXTENSIONS",
]

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "tif", "tiff", "webp", "bmp", "gif")
_FACTORY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


def _uri(value: str) -> str:
    if not value.strip():
        raise ValueError("expected a path or URI, but got an empty string")
    return value.strip()


#: A non-empty path or URI, surrounding whitespace removed.
UriStr = Annotated[str, AfterValidator(_uri)]


class SpecError(ValueError):
    """A job file that cannot run; the message is one line meant for the user."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ScaleSpec(_Strict):
    """Linear scaling of band values to 0..255 (scenes): fixed `min`/`max`, or per-scene `percentile`s."""

    min: float | tuple[float, ...] | None = Field(
        default=None, description="Value that becomes 0: one number, or one per band read."
    )
    max: float | tuple[float, ...] | None = Field(
        default=None, description="Value that becomes 255: one number, or one per band read."
    )
    percentile: tuple[float, float] | None = Field(
        default=None,
        description="Instead of min/max: per scene and band, the [low, high] percentiles of its values (nodata "
        "left out) become 0 and 255. Stats source: the scene's smallest internal overview whose longest side is "
        "at least 512 px, else 16 evenly spaced 256² windows at full resolution (never the whole scene).",
    )

    @model_validator(mode="after")
    def _ordered(self) -> "ScaleSpec":
        if self.percentile is not None:
            if self.min is not None or self.max is not None:
                raise ValueError("scale takes either min/max or percentile, not both")
            lo_p, hi_p = self.percentile
            if not 0 <= lo_p < hi_p <= 100:
                raise ValueError(f"expected 0 <= low < high <= 100, but got percentile [{lo_p}, {hi_p}]")
            return self
        if self.min is None or self.max is None:
            raise ValueError("scale expected both min and max (or percentile)")
        lo = self.min if isinstance(self.min, tuple) else (self.min,)
        hi = self.max if isinstance(self.max, tuple) else (self.max,)
        if len(lo) > 1 and len(hi) > 1 and len(lo) != len(hi):
            raise ValueError(f"scale.min names {len(lo)} bands but scale.max names {len(hi)}")
        n = max(len(lo), len(hi))
        for a, b in zip(lo * n if len(lo) == 1 else lo, hi * n if len(hi) == 1 else hi):
            if not b > a:
                raise ValueError(f"expected scale.max > scale.min, but got min {a}, max {b}")
        return self


class InputSpec(_Strict):
    uri: UriStr = Field(
        description="Images to segment: a prefix/folder (recursive), a glob (`*`, `**`), or a manifest "
        "file (.txt with one URI a line, .csv or .parquet with a `uri` column)."
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec options for the input filesystem (e.g. s3fs `endpoint_url`, `anon`). "
        "Never logged. Prefer the standard AWS_* environment variables for credentials.",
    )
    extensions: tuple[str, ...] = Field(
        default=IMAGE_EXTENSIONS,
        description="File extensions (case-insensitive, no dot) treated as images; others are ignored.",
    )
    max_pixels: PositiveInt = Field(
        default=178_956_970,
        description="Images with more pixels than this are refused as `too_large` before decoding "
        "(decompression-bomb guard).",
    )
    max_bytes: PositiveInt = Field(
        default=512 * 1024 * 1024,
        description="Files larger than this are refused as `too_large` before they are fetched.",
    )

    bands: tuple[PositiveInt, ...] | None = Field(
        default=None,
        description="Scenes (`tiling` set): 1-based band indexes read as R, G, B (GDAL's convention), or one band "
        "read as gray. Default: the first 3 bands, or band 1 of a 1- or 2-band scene.",
    )
    scale: ScaleSpec | None = Field(
        default=None,
        description="Scenes: how band values become 0..255: `{min, max}` (numbers, or one per band), "
        "`v' = round((v - min) * 255 / (max - min))` clipped to 0..255. Default: uint8 as is; uint16 / int16 "
        "by their type's range (0..65535, -32768..32767); float32 as 0..1.",
    )
    assets: tuple[str, ...] | None = Field(
        default=None,
        description="Scenes from a STAC Item / ItemCollection JSON (`input.uri` ending in .json): the asset to read "
        "from each item (one multi-band asset), or one asset per band (`[red, green, blue]`: single-band files on one "
        "pixel grid, stacked in this order; `input.bands` indexes the stack). Default: the item's first GeoTIFF "
        "asset with role `data`, else its first GeoTIFF asset.",
    )
    nodata: float | None = Field(
        default=None,
        description="Scenes: the band value that means 'no data' (a pixel is nodata when every band read holds it). "
        "Default: the file's own nodata value, if it has one.",
    )

    @field_validator("extensions")
    @classmethod
    def _norm_ext(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(e.lower().lstrip(".") for e in v)

    @field_validator("bands")
    @classmethod
    def _band_count(cls, v: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if v is not None and len(v) not in (1, 3):
            raise ValueError(f"expected 1 band (gray) or 3 bands (R, G, B), but got {len(v)}")
        return v


class TilingSpec(_Strict):
    """Present in a job: every input is a raster scene (GeoTIFF / COG) cut into tile windows."""

    size: PositiveInt = Field(default=512, description="Tile window side in pixels (windows at the scene's right and "
                              "bottom edges may be smaller).")
    overlap: int = Field(
        default=64,
        ge=0,
        description="Pixels shared by neighbouring windows. Each output pixel comes from the one window whose core "
        "owns it: overlap/2 is dropped at inner window edges (never at the scene's edges).",
    )
    blend: Literal["core", "weighted"] = Field(
        default="core",
        description="`core`: each pixel from the one window whose core owns it (no accumulator). `weighted` "
        "(semantic only): class probabilities of overlapping windows summed with weights that ramp to 0 at inner "
        "window edges (never at the scene's edges), assembled in row bands (README, 'Satellite scenes').",
    )
    polygons: bool = Field(default=True, description="Also write `polygons/<rel_key>.parquet` (GeoParquet 1.1).")
    polygon_window: PositiveInt = Field(
        default=2048, description="Side of the windows the label raster is polygonized by (bounds memory)."
    )

    @model_validator(mode="after")
    def _fits(self) -> "TilingSpec":
        if self.overlap >= self.size:
            raise ValueError(f"expected tiling.overlap < tiling.size, but got overlap {self.overlap}, size {self.size}")
        return self


class ModelSpec(_Strict):
    task: Literal["semantic", "instance"] = Field(description="`semantic` (label map) or `instance` (masks per object).")
    arch: str | None = Field(
        default=None,
        description="A torchvision architecture name (see README) or a user factory `package.module:function`. "
        "May be omitted only for `builtin:` weights.",
    )
    weights: str = Field(
        default="none",
        description="`none` (random init, seeded), `torchvision` (the arch's DEFAULT weights via torchvision's "
        "cache), or a path/fsspec URI of a state_dict checkpoint.",
    )
    sha256: str | None = Field(default=None, description="Expected sha256 of the checkpoint file; verified before use.")
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options for reading the checkpoint. Never logged."
    )
    cache_dir: str | None = Field(
        default=None,
        description="Directory for torchvision weight files (default: torch hub's, `$TORCH_HOME/hub/checkpoints`).",
    )
    num_classes: PositiveInt | None = Field(
        default=None,
        description="Number of output classes including background. Default: from the weights, else `classes`, "
        "else torchvision's default for the arch.",
    )
    classes: tuple[str, ...] | None = Field(
        default=None, description="Class names, index = label. Default: from the weights' metadata."
    )
    batch_size: PositiveInt = Field(default=4, description="Images per model call on one actor.")
    score_threshold: float = Field(default=0.5, ge=0.0, le=1.0, description="Instance jobs: drop detections below this score.")
    mask_threshold: float = Field(default=0.5, gt=0.0, lt=1.0, description="Instance jobs: mask probability cut-off.")
    max_detections: PositiveInt = Field(default=100, description="Instance jobs: most instances kept per image.")
    precision: Literal["fp32", "fp16", "bf16"] = Field(
        default="fp32", description="Autocast precision on CUDA; CPU actors always run fp32."
    )
    resize: PositiveInt | tuple[PositiveInt, PositiveInt] | None = Field(
        default=None,
        description="Semantic: resize the shorter side to N, or to [height, width], before the model "
        "(masks are resized back). Instance: Mask R-CNN's own `min_size`. Default: none for checkpoints, "
        "the weights' preset for torchvision weights.",
    )
    mean: tuple[float, float, float] | None = Field(
        default=None, description="Normalisation mean (RGB, 0-1 scale). Default: ImageNet's."
    )
    std: tuple[PositiveFloat, PositiveFloat, PositiveFloat] | None = Field(
        default=None, description="Normalisation std (RGB, 0-1 scale). Default: ImageNet's."
    )

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, v: str | None) -> str | None:
        if v is None or v in SEMANTIC_ARCHS or v in INSTANCE_ARCHS or _FACTORY_RE.match(v):
            return v
        known = ", ".join(SEMANTIC_ARCHS + INSTANCE_ARCHS)
        raise ValueError(f"expected one of {known} or a factory 'package.module:function'")

    @field_validator("sha256")
    @classmethod
    def _hex(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", v):
            raise ValueError("expected 64 hex digits")
        return v.lower() if v else v

    @model_validator(mode="after")
    def _consistent(self) -> "ModelSpec":
        if self.arch is None and not self.weights.startswith("builtin:"):
            raise ValueError("model.arch is required unless model.weights is a builtin: model")
        if self.arch in SEMANTIC_ARCHS and self.task != "semantic":
            raise ValueError(f"arch '{self.arch}' is a semantic model, but task is '{self.task}'")
        if self.arch in INSTANCE_ARCHS and self.task != "instance":
            raise ValueError(f"arch '{self.arch}' is an instance model, but task is '{self.task}'")
        if self.classes is not None and self.num_classes is not None and len(self.classes) != self.num_classes:
            raise ValueError(
                f"model.num_classes is {self.num_classes} but model.classes names {len(self.classes)} classes"
            )
        if self.weights == "torchvision" and self.arch is not None and ":" in self.arch:
            raise ValueError("weights 'torchvision' needs a torchvision arch, not a user factory")
        return self


#: Names a layer may not take: the folders a single-model output holds (a layer's folder sits beside them).
RESERVED_LAYER_NAMES = frozenset(
    {"masks", "metadata", "errors", "runs", "superseded", "exports", "report", "scenes", "polygons", "parts"}
)


class LayerSpec(ModelSpec):
    """One model of a several-model job (`layers:`): every `model` key plus the layer's `name`.

    Its results go under `OUTPUT/<name>/` in exactly the single-model layout.
    """

    name: str = Field(description="The layer's name: its folder under output.uri (letters, digits, `_ . -`).")

    @field_validator("name")
    @classmethod
    def _layer_name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError("expected letters, digits, '_', '.' or '-' (at most 100)")
        if v.lower() in RESERVED_LAYER_NAMES:
            raise ValueError(f"'{v}' is a folder every output holds; choose another layer name")
        return v


class OutputSpec(_Strict):
    uri: UriStr = Field(description="Prefix/folder that receives masks/, metadata/, errors/ and runs/.")
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options for the output filesystem. Never logged."
    )
    instance_png: bool = Field(
        default=False, description="Instance jobs: also write a 16-bit instance-id PNG per image under masks/."
    )
    commit_rows: PositiveInt = Field(
        default=1000, description="Metadata rows per committed Parquet part (a commit also happens every commit_seconds)."
    )
    commit_seconds: PositiveFloat = Field(default=30.0, description="Longest time finished rows wait before they are committed.")


class ComputeSpec(_Strict):
    actors: PositiveInt | tuple[PositiveInt, PositiveInt] = Field(
        default=1, description="Predict actors: a fixed N, or [min, max] for an autoscaling pool."
    )
    gpus_per_actor: NonNegativeFloat = Field(default=0.0, description="GPUs each predict actor reserves (fractions allowed).")
    cpus_per_actor: PositiveFloat = Field(
        default=1.0, description="CPUs each predict actor reserves (see `threads_per_actor` for its torch threads)."
    )
    threads_per_actor: PositiveInt | None = Field(
        default=None,
        description="Torch threads per predict actor. Default: `cpus_per_actor` (rounded), except for a CPU-only job "
        "with a fixed number of actors on a one-node Ray (a laptop): there each actor takes its share of all the node's "
        "cores (never fewer than it reserves); load and write tasks run between torch's parallel regions.",
    )
    streams_per_actor: PositiveInt | None = Field(
        default=None,
        description="Forward passes each predict actor runs at once, its torch threads split among them, at most one "
        "per thread (a small batch gives one pass's threads little to share: on 2 cores LRASPP 512² at batch 1 runs "
        "~30% faster as two 1-thread passes than as one 2-thread pass). Default: 1, except where the actor takes the "
        "node's cores (a CPU-only fixed pool on a one-node Ray, `threads_per_actor` unset): there one pass per thread, "
        "at most 4.",
    )
    cpus_per_loader: PositiveFloat = Field(default=1.0, description="CPUs each load (fetch + decode) task reserves.")
    memory_per_loader: PositiveInt = Field(
        default=512 * 1024 * 1024,
        description="Memory (bytes) each load task reserves for its decoded images; keeps decode in its own stage.",
    )
    jpeg_decode: Literal["loader", "device"] = Field(
        default="loader",
        description="Where JPEGs are decoded: `loader` (CPU tasks, Pillow) or `device`: load tasks fetch and check "
        "the header, the predict actor decodes with torchvision's `decode_jpeg` on its device (nvJPEG on a GPU; "
        "libjpeg-turbo on a CPU actor). Other formats, CMYK and files cut short are always decoded by loaders.",
    )
    load_batch_size: PositiveInt = Field(
        default=16,
        description="Images fetched concurrently and decoded per load task (at most: with several streams per actor, a "
        "small job's load tasks shrink so that every stream gets blocks to work on).",
    )
    fetch_concurrency: PositiveInt = Field(default=16, description="Concurrent object fetches within one load task.")

    @field_validator("actors")
    @classmethod
    def _range(cls, v: int | tuple[int, int]) -> int | tuple[int, int]:
        if isinstance(v, tuple) and v[0] > v[1]:
            raise ValueError(f"expected [min, max] with min <= max, but got [{v[0]}, {v[1]}]")
        return v


def _same_as(section: type[BaseModel], name: str) -> Any:
    """A settings field with the default and description of the spec key it carries (defaults live once)."""
    f = section.model_fields[name]
    if f.default_factory is not None:
        return Field(default_factory=f.default_factory, description=f.description)
    return Field(default=f.default, description=f.description)


class SceneSettings(_Strict):
    """What the scene load and write stages read of a job (:meth:`JobSpec.scene_settings`)."""

    storage_options: dict[str, Any] = _same_as(InputSpec, "storage_options")
    bands: tuple[int, ...] | None = _same_as(InputSpec, "bands")
    scale: ScaleSpec | None = _same_as(InputSpec, "scale")
    nodata: float | None = _same_as(InputSpec, "nodata")
    assets: tuple[str, ...] | None = _same_as(InputSpec, "assets")
    size: int = _same_as(TilingSpec, "size")
    overlap: int = _same_as(TilingSpec, "overlap")
    blend: Literal["core", "weighted"] = _same_as(TilingSpec, "blend")


class LoadSettings(_Strict):
    """What the load stage reads of a job (:meth:`JobSpec.load_settings`): input limits and fetch options."""

    storage_options: dict[str, Any] = _same_as(InputSpec, "storage_options")
    max_pixels: int = _same_as(InputSpec, "max_pixels")
    max_bytes: int = _same_as(InputSpec, "max_bytes")
    fetch_concurrency: int = _same_as(ComputeSpec, "fetch_concurrency")
    jpeg_decode: Literal["loader", "device"] = _same_as(ComputeSpec, "jpeg_decode")


class PredictSettings(_Strict):
    """What the predict actor reads of a job (:meth:`JobSpec.predict_settings`), beyond weights and layout."""

    batch_size: int = _same_as(ModelSpec, "batch_size")
    score_threshold: float = _same_as(ModelSpec, "score_threshold")
    mask_threshold: float = _same_as(ModelSpec, "mask_threshold")
    max_detections: int = _same_as(ModelSpec, "max_detections")
    precision: Literal["fp32", "fp16", "bf16"] = _same_as(ModelSpec, "precision")
    instance_png: bool = _same_as(OutputSpec, "instance_png")
    probabilities: bool = Field(
        default=False, description="Semantic: also return each image's class probabilities (`probs`, C x H x W float16): "
        "set for scenes with `tiling.blend: weighted`."
    )


class RunSpec(_Strict):
    max_error_fraction: float = Field(
        default=0.05,
        ge=0.0,
        le=1.0,
        description="The job exits non-zero (after writing everything) when more than this share of items failed.",
    )


class JobSpec(_Strict):
    name: str = Field(description="Job name: letters, digits, `_ . -`; used in run ids and submission ids.")
    input: InputSpec
    model: ModelSpec | None = Field(default=None, description="The model (or `layers`: several models in one pass).")
    layers: tuple[LayerSpec, ...] | None = Field(
        default=None,
        description="Instead of `model`: several models, each image fetched and decoded once and run through every "
        "layer; layer `<name>`'s results go under `output.uri/<name>/` in the single-model layout (README, 'Layers').",
    )
    output: OutputSpec
    compute: ComputeSpec = Field(default_factory=ComputeSpec)
    run: RunSpec = Field(default_factory=RunSpec)
    tiling: TilingSpec | None = Field(
        default=None,
        description="Present: each input is a raster scene (GeoTIFF/COG) cut into windows, and the results are one "
        "label COG and GeoParquet polygons per scene (README, 'Satellite scenes'). Absent: each input is an image.",
    )

    @model_validator(mode="after")
    def _one_model_or_layers(self) -> "JobSpec":
        if self.model is None and self.layers is None:
            raise ValueError("missing required key 'model' (or 'layers', for several models in one pass)")
        if self.model is not None and self.layers is not None:
            raise ValueError("expected either 'model' (one model) or 'layers' (several models), but got both")
        if self.layers is not None:
            if not self.layers:
                raise ValueError("layers expected at least one layer")
            names = [layer.name for layer in self.layers]
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                raise ValueError(f"layer names must differ, but '{twice[0]}' is used twice")
            if self.tiling is not None:
                raise ValueError("layers apply to image jobs; a scene job (`tiling`) takes one `model`")
            if self.compute.jpeg_decode == "device":
                raise ValueError("compute.jpeg_decode: device decodes inside one model's actor; with layers use `loader`")
        return self

    @model_validator(mode="after")
    def _scene_task(self) -> "JobSpec":
        i = self.input
        if self.tiling is None and (i.bands or i.scale or i.nodata is not None or i.assets):
            raise ValueError("input.bands, input.scale, input.nodata and input.assets apply to scenes: add a `tiling` section")
        if self.tiling is not None and self.tiling.blend == "weighted" and self.first_model.task != "semantic":
            raise ValueError("tiling.blend: weighted blends class probabilities, so it needs model.task: semantic "
                             "(instance scenes keep each object in the one window that owns it)")
        if i.assets is not None and not i.assets:
            raise ValueError("input.assets expected at least one asset key")
        return self

    @field_validator("name")
    @classmethod
    def _slug(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError("expected letters, digits, '_', '.' or '-' (at most 100)")
        return v

    def load_settings(self) -> LoadSettings:
        """The load stage's part of the job, whole."""
        i, c = self.input, self.compute
        return LoadSettings(
            storage_options=i.storage_options,
            max_pixels=i.max_pixels,
            max_bytes=i.max_bytes,
            fetch_concurrency=c.fetch_concurrency,
            jpeg_decode=c.jpeg_decode,
        )

    def scene_settings(self) -> SceneSettings:
        """The scene load and write stages' part of the job, whole (needs `tiling`)."""
        i, t = self.input, self.tiling or TilingSpec()
        return SceneSettings(
            storage_options=i.storage_options, bands=i.bands, scale=i.scale, nodata=i.nodata, assets=i.assets,
            size=t.size, overlap=t.overlap, blend=t.blend,
        )

    def predict_settings(self) -> PredictSettings:
        """The predict stage's part of the job, whole (the task and weights travel beside it); of a one-model
        job (a layered job's are those of :meth:`layer_jobs`)."""
        m = self._one_model()
        return PredictSettings(
            batch_size=m.batch_size,
            score_threshold=m.score_threshold,
            mask_threshold=m.mask_threshold,
            max_detections=m.max_detections,
            precision=m.precision,
            # scenes burn their instance-id COG from the merged polygons: windows need no id maps
            instance_png=self.output.instance_png and self.tiling is None,
            probabilities=self.tiling is not None and self.tiling.blend == "weighted",
        )

    @property
    def layered(self) -> bool:
        """A several-model job (`layers:`)."""
        return self.layers is not None

    def layer_jobs(self) -> list[tuple[str, "JobSpec"]]:
        """Each layer as the single-model job it equals: (name, job with that `model` and
        `output.uri/<name>/`). A one-model job is [("", itself)].

        Every per-model step (weights, fingerprint, ledger, commit, manifest) runs on these, so a layer's
        output is exactly what a single-model job would write.
        """
        if self.layers is None:
            return [("", self)]
        base = self.output.uri.rstrip("/")
        return [
            (
                layer.name,
                self.model_copy(
                    update={
                        "model": ModelSpec.model_validate(layer.model_dump(exclude={"name"})),
                        "layers": None,
                        "output": self.output.model_copy(update={"uri": f"{base}/{layer.name}"}),
                    }
                ),
            )
            for layer in self.layers
        ]

    def _one_model(self) -> ModelSpec:
        if self.model is None:
            raise TypeError("a layered job has one model per layer: use layer_jobs()")
        return self.model

    @property
    def first_model(self) -> ModelSpec:
        """The model of a one-model job, or the first layer's (for settings every layer shares)."""
        if self.model is not None:
            return self.model
        assert self.layers
        return self.layers[0]

    def redacted(self) -> dict[str, Any]:
        """The spec as a dict with every storage_options value hidden: safe for manifests and logs."""
        data = self.model_dump(mode="json")
        sections = [data[k] for k in ("input", "model", "output") if data.get(k)] + list(data.get("layers") or [])
        for section in sections:
            opts = section.get("storage_options")
            if opts:
                section["storage_options"] = {k: "***" for k in opts}
        return data

    def result_fingerprint(self, weights_sha256: str) -> str:
        """Digest of everything that changes a prediction (model, weights, preprocessing); of a one-model job
        (a layer's is its :meth:`layer_jobs` job's, so a layer and the same model alone share it)."""
        m = self._one_model()
        keys = {
            "task": m.task,
            "arch": m.arch,
            "weights_sha256": weights_sha256,
            "num_classes": m.num_classes,
            "score_threshold": m.score_threshold,
            "mask_threshold": m.mask_threshold,
            "max_detections": m.max_detections,
            "precision": m.precision,
            "resize": m.resize,
            "mean": m.mean,
            "std": m.std,
        }
        if self.tiling is not None:  # what a scene's pixels become before the model, and where windows fall
            i = self.input
            keys["scene"] = {
                "bands": i.bands,
                "scale": i.scale.model_dump() if i.scale else None,
                "nodata": i.nodata,
                "size": self.tiling.size,
                "overlap": self.tiling.overlap,
            }
            if self.tiling.blend != "core":  # only then: outputs of core jobs keep their fingerprint
                keys["scene"]["blend"] = self.tiling.blend
        return hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()[:16]


def add_override_argument(parser: "argparse.ArgumentParser", what: str = "a job key") -> None:
    """The `--set KEY=VALUE` option every job-taking command shares (values are YAML)."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override {what}, e.g. --set model.batch_size=16 (repeatable; VALUE is YAML)",
    )


def _apply_override(data: dict[str, Any], assignment: str, source: str) -> None:
    if "=" not in assignment:
        raise SpecError(f"{source}: --set expected 'dotted.key=value', but got '{assignment}'")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise SpecError(f"{source}: --set expected 'dotted.key=value', but got '{assignment}'")
    node = data
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise SpecError(f"{source}: --set {key}: '{part}' is not a section")
        node = nxt
    node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""


def _section_type(annotation: Any) -> type[BaseModel] | None:
    """The section model a field holds: `X`, `X | None` or `tuple[X, ...]` (a list of sections) → X."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _section_type(arg) if arg is not Ellipsis and arg is not type(None) else None
        if found is not None:
            return found
    return None


def _model_at(path: tuple[Any, ...]) -> type[BaseModel] | None:
    """The section model at a location of the job (`()` is the job itself), or None for a plain value;
    list indexes (`layers.0`) stay on the list's section."""
    cls: type[BaseModel] = JobSpec
    for part in path:
        if isinstance(part, int):
            continue
        field = cls.model_fields.get(part) if isinstance(part, str) else None
        found = _section_type(field.annotation) if field is not None else None
        if found is None:
            return None
        cls = found
    return cls


def _key_loc(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """A pydantic error location as the user's key: section and field names, list indexes, without the
    union-member tags pydantic adds (`compute.actors.constrained-int` → `compute.actors`)."""
    out: list[Any] = []
    cls: type[BaseModel] | None = JobSpec
    for part in loc:
        if isinstance(part, int):
            out.append(part)
        elif cls is not None:
            out.append(part)
            field = cls.model_fields.get(part)
            cls = _section_type(field.annotation) if field is not None else None
    return tuple(out)


def _suggestion(loc: tuple[Any, ...]) -> str | None:
    """The known key at the same place whose name is closest to an unknown key's, if one is close."""
    parent, name = loc[:-1], loc[-1]
    cls = _model_at(parent)
    if cls is None or not isinstance(name, str):
        return None
    candidates = {f.lower(): f for f in cls.model_fields}
    close = difflib.get_close_matches(name.lower(), list(candidates), n=1, cutoff=0.6)
    return candidates[close[0]] if close else None


def _dotted(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "<job>"


def _format_error(err: ValidationError, source: str, set_keys: frozenset[str] = frozenset()) -> str:
    """Every problem of a job file on one line, joined by '; ', each naming the key.

    An unknown key close to a known one gets "did you mean"; when that known key is also missing, the
    "missing required key" for it is left out (one mistake, one message). Unknown keys that came from
    `--set` say so (they are not in the file).
    """
    errors = err.errors()
    suggestions: dict[tuple[Any, ...], tuple[Any, ...]] = {}  # unknown key -> the known key it resembles
    for e in errors:
        if e["type"] == "extra_forbidden":
            loc = _key_loc(e["loc"])
            close = _suggestion(loc)
            if close is not None:
                suggestions[loc] = loc[:-1] + (close,)
    explained = set(suggestions.values())

    problems: list[tuple[str, str]] = []  # ("text", line) or ("invalid", key)
    invalid: dict[str, tuple[str, list[str]]] = {}  # key -> (value, messages): union branches merged
    for e in errors:
        loc = _key_loc(e["loc"])
        key = _dotted(loc)
        via_set = " in --set" if key in set_keys else ""
        if e["type"] == "missing":
            if loc not in explained:
                problems.append(("text", f"missing required key '{key}'"))
        elif e["type"] == "extra_forbidden":
            hint = f" (did you mean '{_dotted(suggestions[loc])}'?)" if loc in suggestions else ""
            problems.append(("text", f"unknown key '{key}'{via_set}{hint}"))
        elif not loc:  # a rule across sections (model or layers, scene keys without tiling): its message says it all
            problems.append(("text", e["msg"].removeprefix("Value error, ")))
        else:
            value = e.get("input")
            msg = e["msg"].removeprefix("Value error, ")
            if key in invalid:
                if msg not in invalid[key][1]:
                    invalid[key][1].append(msg)
                continue
            shown = json.dumps(value, default=str) if not isinstance(value, dict) else "{...}"
            if len(shown) > 80:
                shown = shown[:77] + "..."
            invalid[key] = (shown, [msg])
            problems.append(("invalid", key))  # worded below, once every union branch's message is in
    lines = []
    for kind, text in problems:
        if kind == "invalid":
            shown, msgs = invalid[text]
            text = f"key '{text}' has invalid value {shown}: {' or '.join(msgs)}"
        lines.append(text)
    return f"{source}: " + "; ".join(lines)


def parse_job(data: Any, source: str = "<job>", overrides: list[str] | None = None) -> JobSpec:
    """Validate a job dict (already parsed YAML), applying `--set` overrides first."""
    if not isinstance(data, dict):
        raise SpecError(f"{source}: expected a YAML mapping at the top level, but got {type(data).__name__}")
    for assignment in overrides or []:
        _apply_override(data, assignment, source)
    set_keys = frozenset(a.split("=", 1)[0].strip() for a in overrides or [])
    try:
        return JobSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(_format_error(e, source, set_keys)) from None


def load_job(path: str | Path, overrides: list[str] | None = None) -> JobSpec:
    """Read and validate a job YAML file.

    Raises:
        SpecError: one line naming the file, the key and the problem.
    """
    source = str(path)
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise SpecError(f"{source}: cannot read job file: {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise SpecError(f"{source}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    return parse_job(data, source, overrides)
