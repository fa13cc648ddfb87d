"""Train the shipped `builtin:shapes` models on synthetic scenes (:mod:`segbatch.synth`).

Two models, one script:

- **semantic**: `segbatch.models.small:unet_small` (a compact U-Net, ~1.0M parameters): cross-entropy
  plus soft Dice on the foreground classes; inputs as the predictor feeds them (RGB / 255, ImageNet
  mean/std, no resize).
- **instance**: `segbatch.models.small:maskrcnn_small` (torchvision `MaskRCNN`, narrow backbone/FPN/heads,
  ~1.5M parameters): torchvision's own losses; boxes and masks are the *visible* parts, as in the COCO
  truth. In training only, fewer RPN proposals (1000/500 before/after NMS) and 128 sampled RoIs per
  image (scenes hold at most 12 objects); inference keeps torchvision's settings.

`--semantic-arch` / `--instance-arch` train any other `model.arch` a job accepts (e.g.
`lraspp_mobilenet_v3_large`, ~3.2M parameters) with the same recipe; the checkpoint names its arch.

Data: batch `b` (0-based) draws its image size (each side 192-384 px) from `default_rng([seed_start, b])`
and its `batch_size` scenes from seeds `seed_start + b * batch_size + i` through
`segbatch.synth.make_scene(default_rng(seed), height, width)`; half of the images are round-tripped
through JPEG (quality 60-95); the semantic model sees a random `--crop` window of each (default
160x160, about a third of an average scene's pixels: the model is fully convolutional, and a CPU step
costs a third). So a run of S steps trains on scene seeds `[seed_start, seed_start + S * batch_size)`,
all inside `segbatch.synth.TRAIN_SEEDS` = [0, 10_000_000); the demo and evaluations use seeds from
10_000_000 up, and the validation here uses 20_000_000 up.

Optimiser: AdamW with linear warm-up then cosine decay over the budget (`--steps`, and/or
`--minutes` as a wall-clock cap: progress is the larger of the two fractions, so a run with only
`--steps` is reproducible step for step on the same device and thread count).

Output (`--out`, default the package's `segbatch/models/builtin/`): `shapes-<task>.pt`, a
`{"state_dict": fp16 tensors, "classes", "arch", "mean", "std", "recipe"}` checkpoint that jobs load with
`model: {task: ..., weights: builtin:shapes}`, and `RECIPE.md` (recipe, seed range, validation
metrics and sha256 of every `shapes-*.pt` there). After saving, the file is loaded back through
`segbatch.models.resolve_weights` + `Predictor` (the job's path) and validated on fresh scenes.

`--init FILE` continues from an earlier `shapes-<task>.pt` (a second schedule; the recipe records the
file's sha256). `--semantic-from-instance FILE` trains nothing: it writes `shapes-semantic.pt` as the
instance model behind a semantic interface (`segbatch.models.small:maskrcnn_small_semantic`), which is
what ships, because the U-Net did not learn the classes on this budget (training/README.md).

Examples (training/README.md lists the exact commands behind the shipped files):
    python training/train_shapes.py --task instance --steps 4000 --minutes 58
    python training/train_shapes.py --semantic-from-instance segbatch/models/builtin/shapes-instance.pt
    # a smoke run that leaves the package alone
    python training/train_shapes.py --task both --minutes 2 --out /tmp/shapes-smoke --val-count 10
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

from segbatch.models.small import SEMANTIC_SCORE_THRESHOLD  # noqa: E402
from segbatch.models.zoo import build_model  # noqa: E402
from segbatch.synth import CLASSES, SIZE_RANGE, TRAIN_SEEDS, coco_annotations, coco_categories, make_scene, scene_from_seed  # noqa: E402

ARCH = {"semantic": "segbatch.models.small:unet_small", "instance": "segbatch.models.small:maskrcnn_small"}
SEMANTIC_FROM_INSTANCE = "segbatch.models.small:maskrcnn_small_semantic"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VAL_SEED = 20_000_000
DEFAULTS = {  # per task: batch size, learning rate, warm-up steps
    "semantic": {"batch_size": 8, "lr": 2e-3, "warmup": 100},
    "instance": {"batch_size": 4, "lr": 1e-3, "warmup": 200},
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- data -----------------------------------------------------------------------------------------


def _jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


class ShapeBatches(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Batch `b` → (images uint8 BxHxWx3, labels BxHxW, list of per-image targets), all one size."""

    def __init__(self, seed_start: int, batch_size: int, steps: int, crop: int | None = None) -> None:
        self.seed_start, self.batch_size, self.steps, self.crop = seed_start, batch_size, steps, crop

    def __len__(self) -> int:
        return self.steps

    def seeds(self, b: int) -> range:
        start = self.seed_start + b * self.batch_size
        return range(start, start + self.batch_size)

    def __getitem__(self, b: int) -> dict[str, Any]:
        size_rng = np.random.default_rng([self.seed_start, b])
        h, w = (int(v) for v in size_rng.integers(SIZE_RANGE[0], SIZE_RANGE[1] + 1, size=2))
        images, labels, targets = [], [], []
        for seed in self.seeds(b):
            if seed not in TRAIN_SEEDS:
                raise ValueError(f"training seed {seed} is outside TRAIN_SEEDS {TRAIN_SEEDS}")
            rng = np.random.default_rng(seed)
            scene = make_scene(rng, h, w)
            image = _jpeg(scene.image, int(rng.integers(60, 96))) if rng.random() < 0.5 else scene.image
            if self.crop:  # a random crop-by-crop window (semantic: the model is fully convolutional)
                y0, x0 = int(rng.integers(0, h - self.crop + 1)), int(rng.integers(0, w - self.crop + 1))
                window = (slice(y0, y0 + self.crop), slice(x0, x0 + self.crop))
                images.append(image[window])
                labels.append(scene.labels[window])
                continue
            images.append(image)
            labels.append(scene.labels)
            boxes, classes, masks = [], [], []
            for k, cls in enumerate(scene.classes):
                m = scene.instances == k + 1
                ys, xs = np.nonzero(m)
                if ys.size == 0:
                    continue
                boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])  # COCO-style visible extent
                classes.append(cls)
                masks.append(m)
            targets.append(
                {
                    "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                    "labels": torch.tensor(classes, dtype=torch.int64),
                    "masks": torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, h, w), dtype=torch.uint8),
                }
            )
        return {
            "images": torch.from_numpy(np.stack(images)),
            "labels": torch.from_numpy(np.stack(labels)),
            "targets": targets,
        }


# --- training -------------------------------------------------------------------------------------


def _lr_factor(progress: float, step: int, warmup: int) -> float:
    warm = min(1.0, (step + 1) / warmup)
    return warm * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def _semantic_loss(model: torch.nn.Module, batch: dict[str, Any], device: torch.device) -> torch.Tensor:
    x = batch["images"].to(device).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    y = batch["labels"].to(device).long()
    logits = model((x - mean) / std)["out"]
    ce = torch.nn.functional.cross_entropy(logits, y)
    prob = logits.softmax(dim=1)
    onehot = torch.nn.functional.one_hot(y, logits.shape[1]).permute(0, 3, 1, 2).float()
    inter = (prob * onehot).sum(dim=(0, 2, 3))
    denom = prob.sum(dim=(0, 2, 3)) + onehot.sum(dim=(0, 2, 3))
    dice = 1 - (2 * inter[1:] + 1) / (denom[1:] + 1)
    return ce + 0.5 * dice.mean()


def _instance_loss(model: torch.nn.Module, batch: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, dict[str, float]]:
    images = [im.to(device).permute(2, 0, 1).float().div_(255.0) for im in batch["images"]]
    targets = [{k: v.to(device) for k, v in t.items()} for t in batch["targets"]]
    losses = model(images, targets)
    return sum(losses.values()), {k: float(v.detach()) for k, v in losses.items()}  # type: ignore[return-value]


def train(task: str, args: argparse.Namespace, device: torch.device) -> tuple[torch.nn.Module, dict[str, Any]]:
    d = DEFAULTS[task]
    batch_size = args.batch_size or d["batch_size"]
    lr = args.lr or d["lr"]
    warmup = d["warmup"]
    torch.manual_seed(args.torch_seed)
    arch = (args.semantic_arch if task == "semantic" else args.instance_arch) or ARCH[task]
    model = build_model(task, arch, len(CLASSES))
    init_from = None
    if args.init:  # continue from an earlier checkpoint of this script (a second, shorter schedule)
        data = Path(args.init).read_bytes()
        ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()})
        init_from = {"file": Path(args.init).name, "sha256": hashlib.sha256(data).hexdigest(),
                     "its_recipe": {k: ckpt.get("recipe", {}).get(k) for k in ("steps", "scene_seeds", "seconds", "command")}}
    sampling = ""
    if task == "instance" and hasattr(model, "rpn"):
        # Training-time sampling only (not saved with the weights): fewer proposals and RoI samples per
        # image; scenes hold at most 12 objects, and it makes a CPU step ~40% cheaper.
        model.rpn._pre_nms_top_n["training"] = args.rpn_pre_nms
        model.rpn._post_nms_top_n["training"] = args.rpn_post_nms
        model.roi_heads.fg_bg_sampler.batch_size_per_image = args.roi_samples
        sampling = (f"; RPN pre/post-NMS proposals in training {args.rpn_pre_nms}/{args.rpn_post_nms}, "
                    f"{args.roi_samples} RoI samples per image")
    eval_min_size = None
    if task == "instance" and args.train_min_sizes and hasattr(model, "transform"):
        # torchvision's transform picks one of `min_size` at random per image in training and uses the
        # last in eval, so the arch's own size is put back before saving.
        eval_min_size = model.transform.min_size
        model.transform.min_size = tuple(args.train_min_sizes)
        sampling += f"; short side resized to one of {list(args.train_min_sizes)} px at random"
    model.to(device).train()
    n_params = sum(p.numel() for p in model.parameters())
    max_steps = args.steps or 10**9
    budget_s = args.minutes * 60 if args.minutes else None
    crop = args.crop if task == "semantic" and args.crop else None
    if crop is not None and not 0 < crop <= SIZE_RANGE[0]:
        raise SystemExit(f"--crop expected 1..{SIZE_RANGE[0]}, but got {crop}")
    data = ShapeBatches(args.seed_start, batch_size, min(max_steps, (TRAIN_SEEDS.stop - args.seed_start) // batch_size), crop)
    loader = torch.utils.data.DataLoader(
        data, batch_size=None, shuffle=False, num_workers=args.workers, prefetch_factor=4 if args.workers else None,
        persistent_workers=False,
    )
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 1e-4}, {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    log(f"{task}: {arch} ({n_params / 1e6:.2f}M parameters) on {device}, batch {batch_size}, lr {lr}, "
        f"steps {args.steps or '-'}, minutes {args.minutes or '-'}, data workers {args.workers}")
    start = time.monotonic()
    step, recent, history = 0, [], []
    for batch in loader:
        elapsed = time.monotonic() - start
        progress = max(step / max_steps if args.steps else 0.0, elapsed / budget_s if budget_s else 0.0)
        if progress >= 1.0:
            break
        for g in opt.param_groups:
            g["lr"] = lr * _lr_factor(progress, step, warmup)
        if task == "semantic":
            loss = _semantic_loss(model, batch, device)
            parts: dict[str, float] = {}
        else:
            loss, parts = _instance_loss(model, batch, device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        recent.append(float(loss.detach()))
        step += 1
        if step % args.log_every == 0 or step == 1:
            avg = float(np.mean(recent[-args.log_every:]))
            history.append({"step": step, "loss": round(avg, 4), "seconds": round(time.monotonic() - start, 1)})
            extra = " ".join(f"{k}={v:.3f}" for k, v in parts.items())
            log(f"{task} step {step}: loss {avg:.4f} lr {opt.param_groups[0]['lr']:.2e} "
                f"{(time.monotonic() - start) / step:.2f} s/step {extra}")
    wall = time.monotonic() - start
    if eval_min_size is not None:
        model.transform.min_size = eval_min_size
    model.eval()
    stats = {
        "task": task,
        "arch": arch,
        "parameters": n_params,
        "steps": step,
        "batch_size": batch_size,
        "scene_seeds": [args.seed_start, args.seed_start + step * batch_size],
        "optimizer": f"AdamW lr {lr} (weight decay 1e-4 on weights), warm-up {warmup} steps, cosine to 2%"
        + sampling,
        "loss": "cross-entropy + 0.5 soft Dice (foreground)" if task == "semantic" else "Mask R-CNN losses (torchvision)",
        "augment": "JPEG round trip (quality 60-95) on half the images"
        + (f"; random {crop}x{crop} crops" if crop else "; whole images"),
        "final_loss": round(float(np.mean(recent[-20:])), 4) if recent else None,
        "seconds": round(wall, 1),
        "seconds_per_step": round(wall / max(step, 1), 3),
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
        "torch": str(torch.__version__),
        "python": platform.python_version(),
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "loss_history": history,
    }
    if init_from:
        stats["init"] = init_from
    log(f"{task}: {step} steps in {wall:.0f} s ({stats['seconds_per_step']} s/step), final loss {stats['final_loss']}")
    return model, stats


# --- saving and validation ------------------------------------------------------------------------


def save(model: torch.nn.Module, task: str, stats: dict[str, Any], out: Path) -> Path:
    state = {k: (v.detach().cpu().half() if v.is_floating_point() else v.detach().cpu()) for k, v in model.state_dict().items()}
    ckpt: dict[str, Any] = {"state_dict": state, "classes": list(CLASSES), "arch": stats["arch"], "recipe": stats}
    if task == "semantic":
        ckpt["mean"], ckpt["std"] = list(IMAGENET_MEAN), list(IMAGENET_STD)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"shapes-{task}.pt"
    tmp = path.with_suffix(".pt.tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)
    log(f"{task}: wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
    return path


def validate(task: str, arch: str, path: Path, count: int, score_threshold: float) -> dict[str, Any]:
    """Load the saved file the way a job does and score it on fresh scenes (seeds 20_000_000 up, JPEG q92)."""
    from segbatch.evaluate import coco_metrics, confusion_matrix, iou_metrics
    from segbatch.models import resolve_weights
    from segbatch.layout import ActorLayout
    from segbatch.models.predictor import Predictor
    from segbatch.spec import ModelSpec, PredictSettings

    rw = resolve_weights(ModelSpec(task=task, arch=arch, weights=str(path)))
    predictor = Predictor(
        task, rw, PredictSettings(score_threshold=score_threshold), ActorLayout(threads=torch.get_num_threads())
    )
    cm = np.zeros((len(CLASSES), len(CLASSES) + 1), np.int64)
    truth: dict[str, Any] = {"images": [], "annotations": [], "categories": coco_categories()}
    dets: list[dict[str, Any]] = []
    start = time.monotonic()
    for i in range(count):
        scene = scene_from_seed(VAL_SEED + i)
        image = _jpeg(scene.image, 92)
        h, w = scene.labels.shape
        if task == "semantic":
            pred, _ = predictor.predict_semantic([image])[0]
            cm += confusion_matrix(scene.labels, pred, len(CLASSES))
        else:
            truth["images"].append({"id": i + 1, "file_name": f"{i}.jpg", "height": h, "width": w})
            truth["annotations"] += coco_annotations(scene, i + 1, first_id=len(truth["annotations"]) + 1)
            instances, _ = predictor.predict_instance([image])[0]
            for inst in instances:
                dets.append({"image_id": i + 1, "category_id": inst["label"], "score": inst["score"],
                             "bbox": inst["bbox"], "segmentation": {"size": [h, w], "counts": inst["rle"]}})
    seconds = time.monotonic() - start
    if task == "semantic":
        m = iou_metrics(cm, list(CLASSES))
        result = {"mIoU": m["mIoU"], "mIoU_fg": m["mIoU_fg"], "per_class_iou": {k: v["iou"] for k, v in m["per_class"].items()}}
    else:
        segm, bbox = coco_metrics(truth, dets, "segm"), coco_metrics(truth, dets, "bbox")
        result = {
            "segm": {k: segm[k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")},
            "bbox": {k: bbox[k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")},
            "per_class_segm_AP50": {k: v["AP50"] for k, v in segm["per_class"].items()},
            "score_threshold": score_threshold,
        }
    result.update({"scenes": count, "scene_seeds": [VAL_SEED, VAL_SEED + count], "seconds_per_image": round(seconds / max(count, 1), 3)})
    log(f"{task}: validation {json.dumps(result)}")
    return result


def derive_semantic(instance_path: Path, out: Path, val_count: int) -> Path:
    """`shapes-semantic.pt` from an instance checkpoint: the same weights behind a semantic interface
    (`segbatch.models.small:maskrcnn_small_semantic`: every pixel takes the class of the most confident
    detection covering it). No training; validated like a trained model."""
    data = instance_path.read_bytes()
    ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    recipe = {
        "task": "semantic",
        "arch": SEMANTIC_FROM_INSTANCE,
        "derived_from": {"file": instance_path.name, "sha256": hashlib.sha256(data).hexdigest()},
        "method": f"the instance model's detections (score >= {SEMANTIC_SCORE_THRESHOLD}) painted into a label "
        "map, most confident detection on top (mask probability >= 0.5); background elsewhere. No training of its own.",
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
    }
    state = {f"detector.{k}": v for k, v in ckpt["state_dict"].items()}
    derived = {"state_dict": state, "classes": list(CLASSES), "arch": SEMANTIC_FROM_INSTANCE,
               "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0], "recipe": recipe}
    path = out / "shapes-semantic.pt"
    torch.save(derived, path)
    if val_count:
        recipe["validation"] = validate("semantic", SEMANTIC_FROM_INSTANCE, path, val_count, 0.5)
        torch.save(derived, path)
    log(f"semantic: wrote {path} ({path.stat().st_size / 1e6:.2f} MB), derived from {instance_path.name}")
    return path


def write_recipe(out: Path) -> Path:
    """RECIPE.md from the recipes stored in every `shapes-*.pt` under `out`, with their sha256."""
    lines = [
        "# builtin:shapes — how these weights were made",
        "",
        "Written by `training/train_shapes.py` (do not edit by hand; rerun the script). The models are trained",
        "on synthetic scenes from `segbatch.synth` only; the scene seeds used for training lie in",
        "`segbatch.synth.TRAIN_SEEDS` = [0, 10_000_000). Demo and evaluation seeds start at 10_000_000,",
        "the validation below uses seeds from 20_000_000.",
        "",
    ]
    for path in sorted(out.glob("shapes-*.pt")):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        r = ckpt.get("recipe", {})
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        lines += [
            f"## {path.name}",
            "",
            f"- sha256: `{digest}`",
            f"- size: {path.stat().st_size} bytes (fp16 tensors)",
            f"- arch: `{ckpt.get('arch')}`, classes {ckpt.get('classes')}",
        ]
        for key in ("derived_from", "method", "init", "parameters", "steps", "batch_size", "scene_seeds", "optimizer", "loss", "augment", "final_loss",
                    "seconds", "seconds_per_step", "device", "threads", "torch", "python", "command"):
            if key in r:
                lines.append(f"- {key.replace('_', ' ')}: `{r[key]}`" if key in ("command", "scene_seeds") else f"- {key.replace('_', ' ')}: {r[key]}")
        if "validation" in r:
            lines += ["- validation (loaded as a job loads it, JPEG q92 scenes):", "", "```json",
                      json.dumps(r["validation"], indent=2), "```"]
        lines.append("")
    path = out / "RECIPE.md"
    path.write_text("\n".join(lines))
    log(f"wrote {path}")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=["semantic", "instance", "both"], default="both")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (the schedule's length)")
    p.add_argument("--minutes", type=float, default=None, help="wall-clock cap per model, in minutes")
    p.add_argument("--batch-size", type=int, default=None, help="scenes per step (default: 8 semantic, 4 instance)")
    p.add_argument("--semantic-arch", default=None, help=f"default {ARCH['semantic']}; any model.arch of a semantic job")
    p.add_argument("--instance-arch", default=None, help=f"default {ARCH['instance']}; any model.arch of an instance job")
    p.add_argument("--rpn-pre-nms", type=int, default=1000, help="instance: RPN proposals before NMS in training")
    p.add_argument("--rpn-post-nms", type=int, default=500, help="instance: RPN proposals kept after NMS in training")
    p.add_argument("--roi-samples", type=int, default=128, help="instance: RoIs sampled per image in training")
    p.add_argument("--train-min-sizes", type=int, nargs="+", default=None, metavar="PX",
                   help="instance: resize each training image's short side to one of these, at random "
                   "(scale augmentation; inference keeps the arch's own size)")
    p.add_argument("--crop", type=int, default=160, help="semantic: train on random CROPxCROP windows (0: whole images)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 2e-3 semantic, 1e-3 instance)")
    p.add_argument("--seed-start", type=int, default=0, help="first training scene seed (inside [0, 10_000_000))")
    p.add_argument("--torch-seed", type=int, default=0, help="seed of the weight initialisation")
    p.add_argument("--semantic-from-instance", type=Path, default=None, metavar="SHAPES_INSTANCE_PT",
                   help="no training: write shapes-semantic.pt as this instance checkpoint behind a semantic interface")
    p.add_argument("--init", default=None, help="start from this shapes-<task>.pt instead of random weights")
    p.add_argument("--out", type=Path, default=REPO / "segbatch" / "models" / "builtin", help="where the .pt files and RECIPE.md go")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    p.add_argument("--workers", type=int, default=None, help="data-generation processes (default: 0 on CPU, cores-1 up to 8 on CUDA)")
    p.add_argument("--val-count", type=int, default=100, help="fresh scenes to validate the saved model on (0: skip)")
    p.add_argument("--val-score-threshold", type=float, default=0.5, help="instance validation: the job's score_threshold")
    p.add_argument("--log-every", type=int, default=25)
    args = p.parse_args(argv)
    if not args.steps and not args.minutes and not args.semantic_from_instance:
        p.error("give a budget: --steps and/or --minutes")
    if args.init and args.task == "both":
        p.error("--init continues one model: pick --task semantic or --task instance")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device))
    torch.set_num_threads(args.threads)
    if args.workers is None:
        args.workers = min(8, max(0, (os.cpu_count() or 1) - 1)) if device.type == "cuda" else 0
    if args.semantic_from_instance:
        derive_semantic(args.semantic_from_instance, args.out, args.val_count)
        write_recipe(args.out)
        return 0
    tasks = ["semantic", "instance"] if args.task == "both" else [args.task]
    for task in tasks:
        model, stats = train(task, args, device)
        path = save(model.cpu(), task, stats, args.out)
        if args.val_count:
            stats["validation"] = validate(task, stats["arch"], path, args.val_count, args.val_score_threshold)
            save(model, task, stats, args.out)  # the same tensors, now with the validation in the recipe
        del model
    write_recipe(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
