"""The straightforward Ray Data version of the job, as Ray's batch-inference docs write it.

`read_images` → `map_batches` with an actor pool running the model → `map_batches` saving PNGs. Prints
one JSON line: images, steady-state images/s (after the first quarter of results, startup excluded), wall
seconds, and the seconds from start to the first and to the last results.
Used by `pipeline_efficiency.py`; runnable alone.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time

import numpy as np


class Segmenter:
    def __init__(self, arch: str, num_classes: int) -> None:
        import torch
        import torchvision

        torch.manual_seed(0)
        self.torch = torch
        self.model = torchvision.models.get_model(
            arch, weights=None, weights_backbone=None, num_classes=num_classes
        ).eval()
        self.mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        self.std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        with torch.inference_mode():
            x = torch.from_numpy(np.stack(batch["image"])).permute(0, 3, 1, 2).float() / 255
            labels = self.model((x - self.mean) / self.std)["out"].argmax(1).to(torch.uint8).numpy()
        return {"path": batch["path"], "labels": labels}


def save_pngs(batch: dict[str, np.ndarray], out: str) -> dict[str, np.ndarray]:
    from PIL import Image

    for path, labels in zip(batch["path"], batch["labels"]):
        buf = io.BytesIO()
        Image.fromarray(labels).save(buf, format="PNG")
        with open(os.path.join(out, os.path.basename(str(path)) + ".png"), "wb") as f:
            f.write(buf.getvalue())
    return {"path": batch["path"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("images")
    parser.add_argument("out")
    parser.add_argument("--arch", default="lraspp_mobilenet_v3_large")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--num-classes", type=int, default=21)
    args = parser.parse_args()
    import ray

    start = time.time()
    ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    os.makedirs(args.out, exist_ok=True)
    ds = ray.data.read_images(args.images, mode="RGB", include_paths=True)
    ds = ds.map_batches(
        Segmenter,
        fn_constructor_kwargs={"arch": args.arch, "num_classes": args.num_classes},
        batch_size=args.batch_size,
        concurrency=1,
    )
    ds = ds.map_batches(save_pngs, fn_kwargs={"out": args.out})
    from segbatch.pipeline import _steady_rate  # the same steady-state rule as segbatch's own figure

    arrivals: list[tuple[float, int]] = []
    for batch in ds.iter_batches(batch_size=None):
        arrivals.append((time.time(), (arrivals[-1][1] if arrivals else 0) + len(batch["path"])))
    end = time.time()
    ray.shutdown()
    total = arrivals[-1][1] if arrivals else 0
    first, last = (arrivals[0][0] - start, arrivals[-1][0] - start) if arrivals else (0.0, 0.0)
    print(json.dumps({"images": total, "steady_ips": _steady_rate(arrivals), "wall_seconds": end - start,
                      "first_result_seconds": first, "last_result_seconds": last}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
