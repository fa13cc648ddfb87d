"""Predict stage: the actor that holds one model and turns image batches into compact results.

Batching never changes a prediction: a batch is split into groups of identical image size and each
group runs as one model call, so no image is ever padded (padding changes the output of models
with global pooling, like LRASPP and DeepLabV3's ASPP, and of Mask R-CNN near image borders).

Results leave the actor compact: semantic label maps as uint8 (uint16 above 255 classes) with
per-class pixel counts; instance masks thresholded and cropped on the device, then COCO-RLE encoded
here, so full-size per-instance masks never travel.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_util

from segbatch.errors import first_line
from segbatch.layout import ActorLayout, StreamGate
from segbatch.models.weights import IMAGENET_MEAN, IMAGENET_STD, ResolvedWeights, apply_weights, load_state_dict_bytes
from segbatch.models.zoo import build_model, configure_detector, seeded_init
from segbatch.rows import RowStatus, concat_rows, object_array, take_rows
from segbatch.spec import PredictSettings

__all__ = ["EMPTY_LABELS", "LayerPredictor", "Predictor", "decode_jpegs", "instances_from_output", "orient_chw"]

logger = logging.getLogger(__name__)
EMPTY_LABELS = np.zeros((0, 0), dtype=np.uint8)


def _log_to_stderr_in_workers() -> None:
    """A Ray worker has no logging handlers, so the actor's INFO and WARNING lines would vanish;
    stderr reaches the driver's console through Ray's log forwarding."""
    package = logging.getLogger("segbatch")
    if not package.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        package.addHandler(handler)
        package.setLevel(logging.INFO)


def pick_device() -> torch.device:
    """CUDA when this process was given a GPU (Ray sets CUDA_VISIBLE_DEVICES), else CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def instances_from_output(
    boxes: torch.Tensor,
    labels: torch.Tensor,
    scores: torch.Tensor,
    masks: torch.Tensor,
    mask_threshold: float,
    height: int,
    width: int,
    with_map: bool,
) -> tuple[list[dict[str, Any]], np.ndarray]:
    """Threshold and crop masks on their device, then RLE-encode them on the host.

    Each mask is cropped to the extent of its own pixels (computed on the device from row/column
    occupancy), so only the crops cross to the host. `masks` is `(K, 1, H, W)` probabilities.

    Returns:
        Instances sorted by descending score (`label`, `score`, `bbox` [x, y, w, h] of the mask's
        pixels, `detector_bbox` the detector's own box, `area`, `rle`), and the instance-id map
        (uint16, 1 = highest score; empty unless `with_map`).
    """
    order = torch.argsort(scores, descending=True)
    boxes, labels, scores = boxes[order], labels[order], scores[order]
    binary = masks[order, 0] > mask_threshold if masks.numel() else masks.new_zeros((0, height, width), dtype=torch.bool)
    rows = binary.any(dim=2).cpu().numpy()
    cols = binary.any(dim=1).cpu().numpy()
    boxes_np = boxes.float().cpu().numpy()
    labels_np = labels.cpu().numpy()
    scores_np = scores.float().cpu().numpy()
    canvas = np.zeros((height, width, 1), dtype=np.uint8, order="F")
    id_map = np.zeros((height, width), dtype=np.uint16) if with_map else np.zeros((0, 0), dtype=np.uint16)
    out: list[dict[str, Any]] = []
    crops: list[tuple[int, int, np.ndarray] | None] = []  # (y0, x0, crop) per instance, kept for the id map
    for k in range(len(labels_np)):
        ys, xs = np.flatnonzero(rows[k]), np.flatnonzero(cols[k])
        crops.append(None)
        if ys.size:
            y0, y1, x0, x1 = int(ys[0]), int(ys[-1]) + 1, int(xs[0]), int(xs[-1]) + 1
            crop = binary[k, y0:y1, x0:x1].cpu().numpy()
            crops[k] = (y0, x0, crop)
            canvas[y0:y1, x0:x1, 0] = crop
        rle = mask_util.encode(canvas)[0]
        if ys.size:
            canvas[y0:y1, x0:x1, 0] = 0
        x_min, y_min, x_max, y_max = (float(v) for v in boxes_np[k])
        out.append(
            {
                "label": int(labels_np[k]),
                "score": float(scores_np[k]),
                "bbox": [float(v) for v in mask_util.toBbox(rle)],  # the mask's own box, as annotation tools read it
                "detector_bbox": [x_min, y_min, x_max - x_min, y_max - y_min],
                "area": int(mask_util.area(rle)),
                "rle": rle["counts"].decode("ascii"),
            }
        )
    if with_map:
        for k in reversed(range(len(out))):  # lowest score first, so higher scores paint over
            entry = crops[k]
            if entry is not None:
                y0, x0, crop = entry
                id_map[y0 : y0 + crop.shape[0], x0 : x0 + crop.shape[1]][crop] = k + 1
    return out, id_map


def orient_chw(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """Apply an EXIF orientation (1-8) to a CHW tensor, as `PIL.ImageOps.exif_transpose` does."""
    if orientation == 2:
        return image.flip(2)
    if orientation == 3:
        return image.flip(1, 2)
    if orientation == 4:
        return image.flip(1)
    if orientation == 5:
        return image.transpose(1, 2)
    if orientation == 6:
        return image.transpose(1, 2).flip(2)
    if orientation == 7:
        return image.transpose(1, 2).flip(1, 2)
    if orientation == 8:
        return image.transpose(1, 2).flip(1)
    return image


def decode_jpegs(data: list[bytes], orientations: list[int], device: torch.device) -> list[torch.Tensor]:
    """JPEG bytes → oriented RGB CHW uint8 tensors on `device` (nvJPEG on CUDA, libjpeg-turbo on CPU)."""
    import warnings

    from torchvision.io import ImageReadMode, decode_jpeg

    encoded = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data]
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its image codecs in favour of TorchCodec; decode_jpeg still works
        # and is what runs nvJPEG on a GPU. Moving to torchcodec.decoders.decode_jpeg is a drop-in later.
        warnings.simplefilter("ignore", DeprecationWarning)
        decoded = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    return [orient_chw(im, int(o)) for im, o in zip(decoded, orientations)]


class Predictor:
    """Ray Data actor: image rows in, compact predictions out (the `image` column is dropped).

    Args:
        task: `semantic` or `instance`.
        weights: resolved weights (or an ObjectRef to them), from :func:`resolve_weights`.
        settings: the job's predict settings (:meth:`segbatch.spec.JobSpec.predict_settings`).
        layout: torch threads (all streams together) and concurrent forward passes, decided by the
            driver (:func:`segbatch.layout.decide_layout`); Ray Data must call the actor from
            `layout.streams` threads (`max_concurrent_calls_per_actor`).
    """

    def __init__(
        self,
        task: str,
        weights: Any,
        settings: PredictSettings | None = None,
        layout: ActorLayout | None = None,
    ) -> None:
        try:
            import ray

            if isinstance(weights, ray.ObjectRef):
                weights = ray.get(weights)
        except ImportError:  # pragma: no cover - ray is a hard dependency; kept for Ray-less unit use
            pass
        rw: ResolvedWeights = weights
        self.settings = settings = settings or PredictSettings()
        self.layout = layout = layout or ActorLayout()
        _log_to_stderr_in_workers()
        torch.set_num_threads(layout.threads)
        self.task = task
        self.device = pick_device()
        self.weights = rw
        seeded_init(0)
        model = build_model(task, rw.arch, rw.num_classes)
        if rw.payload is not None:
            state, _ = load_state_dict_bytes(rw.payload, rw.source)
            apply_weights(model, state, rw.source)
        if task == "instance":
            min_size = rw.resize if isinstance(rw.resize, int) else None
            configure_detector(
                model,
                score_threshold=settings.score_threshold,
                max_detections=settings.max_detections,
                min_size=min_size,
                mean=rw.mean,
                std=rw.std,
            )
        self.model = model.to(self.device).eval()
        self.gate = StreamGate(layout.stream_threads)
        self.channels_last = self.device.type == "cuda" and task == "semantic"
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        mean = rw.mean or IMAGENET_MEAN
        std = rw.std or IMAGENET_STD
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)
        self.label_dtype = np.uint8 if rw.num_classes <= 256 else np.uint16
        precision = settings.precision
        self.autocast_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
        if self.autocast_dtype is not None and self.device.type != "cuda":
            logger.warning("model.precision=%s applies on CUDA only; running fp32 on %s", precision, self.device)
            self.autocast_dtype = None

    def _autocast(self) -> Any:
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.autocast_dtype)

    def _to_device(self, images: list[np.ndarray] | torch.Tensor) -> torch.Tensor:
        """Stack uint8 HWC images and move them as uint8 (4x fewer bytes than float), as NCHW.

        A tensor is taken as NCHW uint8 already on the device (images the actor decoded itself).
        """
        if isinstance(images, torch.Tensor):
            return images
        x = torch.from_numpy(np.stack(images))
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        return x.permute(0, 3, 1, 2)

    @torch.inference_mode()
    def predict_semantic(self, images: list[np.ndarray] | torch.Tensor) -> list[tuple[np.ndarray, np.ndarray]]:
        """Same-size images (HWC arrays, or one NCHW uint8 device tensor) → [(label map, per-class pixel counts)]."""
        x = self._to_device(images)
        height, width = x.shape[-2:]
        x = x.float().div_(255.0)
        resize = self.weights.resize
        if resize is not None:
            import torchvision.transforms.v2.functional as TF  # only here: importing torchvision costs ~110 MB

            size = [resize] if isinstance(resize, int) else list(resize)
            x = TF.resize(x, size, antialias=True)
        x = (x - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            out = self.model(x)
        logits = out["out"] if isinstance(out, dict) else out
        if logits.shape[-2:] != (height, width):
            logits = torch.nn.functional.interpolate(logits.float(), size=(height, width), mode="bilinear", align_corners=False)
        labels = logits.argmax(dim=1)
        n_classes = logits.shape[1]
        counts = torch.stack([torch.bincount(lab.flatten(), minlength=n_classes) for lab in labels])
        labels_np = labels.to(torch.int32).cpu().numpy().astype(self.label_dtype)
        counts_np = counts.cpu().numpy().astype(np.int64)
        if self.settings.probabilities:  # scenes with tiling.blend: weighted blend these across windows
            probs = logits.float().softmax(dim=1).to(torch.float16).cpu().numpy()
            return [(labels_np[i], counts_np[i], probs[i]) for i in range(len(labels_np))]
        return [(labels_np[i], counts_np[i]) for i in range(len(labels_np))]

    @torch.inference_mode()
    def predict_instance(self, images: list[np.ndarray] | torch.Tensor) -> list[tuple[list[dict[str, Any]], np.ndarray]]:
        """Same-size images (HWC arrays, or one NCHW uint8 device tensor) → [(instances, instance-id map)]."""
        x = self._to_device(images)
        height, width = int(x.shape[-2]), int(x.shape[-1])
        x = x.float().div_(255.0)
        with self._autocast():
            outputs = self.model(list(x))
        thr = self.settings.mask_threshold
        with_map = self.settings.instance_png
        return [
            instances_from_output(o["boxes"], o["labels"], o["scores"], o["masks"], thr, height, width, with_map)
            for o in outputs
        ]

    def _run_group(self, images: list[np.ndarray] | torch.Tensor) -> list[Any]:
        return self.predict_semantic(images) if self.task == "semantic" else self.predict_instance(images)

    def _decode_on_device(
        self, batch: dict[str, np.ndarray], idxs: list[int], rows: RowStatus
    ) -> tuple[list[int], torch.Tensor | None]:
        """Decode the JPEGs the loader left to us (`compute.jpeg_decode: device`): (decoded idxs, NCHW).

        A file the device decoder rejects becomes a `truncated` error row; the others go on.
        """
        data = [bytes(batch["jpeg"][i]) for i in idxs]
        orient = [int(batch["orientation"][i]) for i in idxs]
        expected = [(int(batch["height"][i]), int(batch["width"][i])) for i in idxs]
        try:
            images = decode_jpegs(data, orient, self.device)
            # Every image must have the size its header promised (the row says so, the mask will too);
            # a mismatch goes the per-file way below and becomes that file's error row.
            if all(tuple(im.shape[-2:]) == size for im, size in zip(images, expected)):
                return idxs, torch.stack(images)
        except Exception:  # noqa: BLE001 - find the bad file(s), keep the rest
            pass
        good, tensors = [], []
        for i, d, o in zip(idxs, data, orient):
            try:
                image = decode_jpegs([d], [o], self.device)[0]
                size = (int(batch["height"][i]), int(batch["width"][i]))
                if tuple(image.shape[-2:]) != size:
                    raise ValueError(f"decoded size {tuple(image.shape[-2:])} differs from the header's {size}")
                tensors.append(image)
                good.append(i)
            except Exception as e:  # noqa: BLE001 - one file's failure is data
                where = f"decoded on {self.device}"
                message = f"{batch['uri'][i]}: JPEG image data is truncated or corrupt ({where}): {first_line(e)}"
                rows.fail(i, "truncated", message[:500])
        return good, (torch.stack(tensors) if tensors else None)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        with self.gate.slot() as threads:
            torch.set_num_threads(threads)  # per calling thread: each stream runs on its own share
            return self._predict_batch(batch)

    def _predict_batch(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        n = len(batch["item_id"])
        rows = RowStatus.of(batch)
        results: dict[int, Any] = {}
        on_device = "jpeg" in batch  # compute.jpeg_decode: device
        groups: dict[tuple[Any, ...], list[int]] = defaultdict(list)
        for i in range(n):
            if not rows.ok(i):
                continue
            if on_device and len(batch["jpeg"][i]):
                groups[("jpeg", int(batch["height"][i]), int(batch["width"][i]))].append(i)
            else:
                groups[tuple(batch["image"][i].shape)].append(i)
        bs = self.settings.batch_size
        for key, idxs in groups.items():
            for start in range(0, len(idxs), bs):
                chunk = idxs[start : start + bs]
                images: list[np.ndarray] | torch.Tensor
                if key[0] == "jpeg":
                    chunk, decoded = self._decode_on_device(batch, chunk, rows)
                    if decoded is None:
                        continue
                    images = decoded
                else:
                    images = [batch["image"][i] for i in chunk]
                try:
                    for i, r in zip(chunk, self._run_group(images)):
                        results[i] = r
                except Exception:  # noqa: BLE001 - isolate the failing image, keep the rest
                    for j, i in enumerate(chunk):
                        try:
                            results[i] = self._run_group(images[j : j + 1])[0]
                        except Exception as e:  # noqa: BLE001 - one image's failure is data
                            message = f"{batch['uri'][i]}: model failed: {type(e).__name__}: {first_line(e)}"
                            rows.fail(i, "model_failed", message[:500])
        out = rows.into({k: v for k, v in batch.items() if k not in ("image", "jpeg", "orientation")})
        if self.task == "semantic":
            out["label_map"] = object_array([results[i][0] if i in results else EMPTY_LABELS for i in range(n)])
            out["class_pixels"] = object_array(
                [results[i][1] if i in results else np.zeros(0, np.int64) for i in range(n)]
            )
            if self.settings.probabilities:
                out["probs"] = object_array([results[i][2] if i in results else np.zeros((0, 0, 0), np.float16) for i in range(n)])
        else:
            out["instances"] = np.asarray(
                [json.dumps(results[i][0], separators=(",", ":")) if i in results else "" for i in range(n)],
                dtype=object,
            )
            out["label_map"] = object_array(
                [results[i][1] if i in results else np.zeros((0, 0), np.uint16) for i in range(n)]
            )
        return out


class LayerPredictor:
    """Ray Data actor of a several-model job (`layers:`): every layer's model in one actor.

    An image is fetched and decoded once (by a loader) and goes through each layer its plan row's
    `layers` bit mask names (the layers that lack it); each layer's rows are exactly what that layer's
    own :class:`Predictor` returns for them. Out come one row per (image, layer), tagged `layer`, with
    both tasks' columns (`class_pixels` empty on instance rows, `instances` "" on semantic rows).

    One actor rather than a pool per layer: the decoded image crosses to one process once, the layers'
    models share the actor's device and streams, and one `compute` section sizes the job.

    Args:
        layers: (name, task, weights or an ObjectRef to them, predict settings) per layer, in bit order.
        layout: as :class:`Predictor`'s; the layers run one after another within each stream.
    """

    def __init__(self, layers: list[tuple[str, str, Any, PredictSettings]], layout: ActorLayout | None = None) -> None:
        self.layout = layout = layout or ActorLayout()
        self.names = [name for name, _, _, _ in layers]
        self.predictors = [Predictor(task, weights, settings, layout) for _, task, weights, settings in layers]
        self.gate = StreamGate(layout.stream_threads)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        with self.gate.slot() as threads:
            torch.set_num_threads(threads)
            return self._predict_layers(batch)

    def _predict_layers(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        wanted = np.asarray(batch["layers"], dtype=np.int64)
        inputs = {k: v for k, v in batch.items() if k != "layers"}
        outs, tasks = [], []
        for k, (name, predictor) in enumerate(zip(self.names, self.predictors)):
            idx = np.flatnonzero(wanted & (1 << k))
            if not idx.size:
                continue
            out = predictor._predict_batch(take_rows(inputs, idx))
            n = len(idx)
            out.setdefault("class_pixels", object_array([np.zeros(0, np.int64)] * n))
            out.setdefault("instances", np.full(n, "", dtype=object))
            out["layer"] = np.full(n, name, dtype=object)
            out["item"] = idx
            outs.append(out)
            tasks.append(predictor.task)
        if not outs:  # no row wants a layer (cannot come from a plan); keep the columns, no rows
            empty = take_rows({k: v for k, v in inputs.items() if k != "image"}, np.zeros(0, dtype=np.int64))
            return {**empty, "label_map": object_array([]), "class_pixels": object_array([]),
                    "instances": np.zeros(0, dtype=object), "layer": np.zeros(0, dtype=object),
                    "layer_disagreement": np.zeros(0, dtype=np.float32)}
        _add_disagreement(outs, tasks)
        return concat_rows(outs)


def _foreground_iou_gap(labels: np.ndarray, instances_json: str) -> float:
    """1 - IoU of a semantic label map's foreground (label != 0) and the union of an image's instance masks."""
    semantic = labels != 0
    instances = json.loads(instances_json) if instances_json else []
    if instances:
        h, w = labels.shape
        rles = [{"size": [h, w], "counts": i["rle"].encode()} for i in instances]
        objects = mask_util.decode(mask_util.merge(rles, intersect=False)).astype(bool)
    else:
        objects = np.zeros_like(semantic)
    union = int(np.count_nonzero(semantic | objects))
    return 0.0 if union == 0 else 1.0 - int(np.count_nonzero(semantic & objects)) / union


def _add_disagreement(outs: list[dict[str, Any]], tasks: list[str]) -> None:
    """`layer_disagreement` on every row: where one image has an ok semantic and an ok instance row in this
    call, 1 - IoU of their foregrounds (the review-order term of `segbatch.export.priority`), on both rows;
    NaN elsewhere (a rerun that runs one layer only, an error row, same-task layers). Drops `item`.

    `outs[k]` is a layer's output, `tasks[k]` its task; the first layer of each task counts.
    """
    semantic: dict[int, np.ndarray] = {}
    instance: dict[int, str] = {}
    for out, task in zip(outs, tasks):
        for j, item in enumerate(out["item"]):
            if out["status"][j] == "ok":
                if task == "semantic":
                    semantic.setdefault(int(item), out["label_map"][j])
                else:
                    instance.setdefault(int(item), str(out["instances"][j]))
    gaps = {
        item: _foreground_iou_gap(labels, instance[item])
        for item, labels in semantic.items()
        if item in instance and labels.size
    }
    for out in outs:
        out["layer_disagreement"] = np.asarray([gaps.get(int(i), np.nan) for i in out["item"]], dtype=np.float32)
        del out["item"]
