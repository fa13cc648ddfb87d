"""Per-stage cost per image, each stage timed alone on the same JPEGs, in one process.

Prints one JSON line of milliseconds per image: list, fetch, decode, predict, encode, write (and their
sum), so when end-to-end throughput falls short of the model alone, the line shows where time goes.

Usage: python benchmarks/stages.py --images 32 --arch lraspp_mobilenet_v3_large --batch-size 4
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import make_jpegs  # noqa: E402

from segbatch.load import decode_image  # noqa: E402
from segbatch.masks import encode_png_label_map  # noqa: E402
from segbatch.models import Predictor, resolve_weights  # noqa: E402
from segbatch.layout import ActorLayout  # noqa: E402
from segbatch.spec import IMAGE_EXTENSIONS, INSTANCE_ARCHS, ModelSpec, PredictSettings  # noqa: E402
from segbatch.storage import filesystem, list_objects, write_bytes_atomic  # noqa: E402


def per_image_ms(seconds: float, n: int) -> float:
    return round(1000 * seconds / n, 3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--arch", default="lraspp_mobilenet_v3_large")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    task = "instance" if args.arch in INSTANCE_ARCHS or "maskrcnn" in args.arch else "semantic"
    work = Path(args.workdir or tempfile.mkdtemp(prefix="segbatch-stages-"))
    folder = work / f"images-{args.height}x{args.width}-{args.images}"
    make_jpegs(folder, args.images, args.height, args.width)
    n = args.images
    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)

    t = time.perf_counter()
    objects, _ = list_objects(str(folder) + "/", {}, IMAGE_EXTENSIONS)
    list_s = time.perf_counter() - t

    fs, _ = filesystem(str(folder))
    t = time.perf_counter()
    blobs = [fs.cat_file(o.uri) for o in objects]
    fetch_s = time.perf_counter() - t

    t = time.perf_counter()
    images = [decode_image(b, o.uri, 178_956_970) for b, o in zip(blobs, objects)]
    decode_s = time.perf_counter() - t

    spec = ModelSpec(task=task, arch=args.arch, weights="none", num_classes=21 if task == "semantic" else 4)
    settings = PredictSettings(batch_size=args.batch_size, score_threshold=0.05)
    pred = Predictor(task, resolve_weights(spec), settings, ActorLayout(threads=cores))
    run = pred.predict_semantic if task == "semantic" else pred.predict_instance
    run(images[: args.batch_size])  # warm-up
    t = time.perf_counter()
    results = []
    for i in range(0, n, args.batch_size):
        results += run(images[i : i + args.batch_size])
    predict_s = time.perf_counter() - t

    maps = [r[0] if task == "semantic" else r[1] for r in results]
    t = time.perf_counter()
    pngs = [encode_png_label_map(m) for m in maps if m.size]
    encode_s = time.perf_counter() - t

    out_fs, out_root = filesystem(str(work / "stages-out"))
    t = time.perf_counter()
    for i, png in enumerate(pngs):
        write_bytes_atomic(out_fs, f"{out_root}/masks/{i:05d}.png", png)
    write_s = time.perf_counter() - t

    stages = {
        "list_ms": per_image_ms(list_s, n),
        "fetch_ms": per_image_ms(fetch_s, n),
        "decode_ms": per_image_ms(decode_s, n),
        "predict_ms": per_image_ms(predict_s, n),
        "encode_ms": per_image_ms(encode_s, n),
        "write_ms": per_image_ms(write_s, n),
    }
    total = sum(stages.values())
    print(
        json.dumps(
            {
                "arch": args.arch,
                "images": n,
                "size": f"{args.height}x{args.width}",
                "batch_size": args.batch_size,
                "cores": cores,
                **stages,
                "total_ms": round(total, 3),
                "non_model_share": round(1 - stages["predict_ms"] / total, 4),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
