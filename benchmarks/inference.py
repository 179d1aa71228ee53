"""Per-image prediction latency on the CPU, split into EdgeBoxes proposals and the network.

    python benchmarks/inference.py [--backbones small,vgg16] [--regions 500] [--images 5] [--out FILE]

What `rgnn.predict` does for one image of VOC size (500x375, a synthetic picture): proposals
(gradient edges + EdgeBoxes, T kept), then the RGNN forward pass at the training input size
(shorter side 600 for VGG-16 as in the paper's Fast R-CNN setting, 192 for the small CNN), random
weights (timing only), region gates, 5 scales, batch of one, no gradient. The paper reports
430 ms per image on a GPU, 200 ms of it EdgeBoxes. Median over --images images after one warm-up.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import cv2
import numpy as np
import torch

from report import RESULTS, write_result
from rgnn.data import shards
from rgnn.data.synthetic import make_image
from rgnn.model import RGNN, ModelConfig
from rgnn.proposals import EdgeBoxes, ProposalParams

IMAGE_SIZE = {"small": 192, "vgg16": 600, "resnet50": 600}
PAPER_MS = {"total_gpu": 430, "edgeboxes": 200}


def voc_sized_images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        image, _ = make_image(rng)
        out.append(cv2.resize(image, (500, 375), interpolation=cv2.INTER_LINEAR))
    return out


@torch.no_grad()
def time_backbone(name: str, images: list[np.ndarray], regions: int) -> dict:
    model = RGNN(ModelConfig(num_classes=20, backbone=name)).eval()
    proposer = EdgeBoxes(ProposalParams(max_boxes=regions))
    size = IMAGE_SIZE[name]
    t_prop, t_net = [], []
    for i, image in enumerate([images[0], *images]):  # the first is a warm-up
        t0 = time.perf_counter()
        boxes, scores = proposer(image)
        t1 = time.perf_counter()
        x, (h, w), b, _ = shards.prepare(image, boxes, scores, size, 1000 if size == 600 else 2 * size, regions)
        model(x[None], torch.tensor([[h, w]]), [b])
        t2 = time.perf_counter()
        if i:
            t_prop.append(t1 - t0)
            t_net.append(t2 - t1)
    prop, net = 1000 * statistics.median(t_prop), 1000 * statistics.median(t_net)
    return {"backbone": name, "input_shorter_side": size, "regions": regions, "proposals_ms": round(prop, 1),
            "network_ms": round(net, 1), "total_ms": round(prop + net, 1)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--backbones", default="small,vgg16")
    p.add_argument("--regions", type=int, default=500, help="T proposals per image")
    p.add_argument("--images", type=int, default=5, help="timed images")
    p.add_argument("--out", default=str(RESULTS / "inference.json"))
    args = p.parse_args(argv)
    images = voc_sized_images(args.images)
    rows = [time_backbone(name, images, args.regions) for name in args.backbones.split(",")]
    print(f"per image, 500x375, T={args.regions}, CPU with {torch.get_num_threads()} threads, random weights:")
    for r in rows:
        print(f"  {r['backbone']:>8} (shorter side {r['input_shorter_side']}): proposals {r['proposals_ms']:7.1f} ms"
              f"  network {r['network_ms']:7.1f} ms  total {r['total_ms']:7.1f} ms")
    print(f"  the paper (GPU): {PAPER_MS['total_gpu']} ms per image, {PAPER_MS['edgeboxes']} ms of it EdgeBoxes")
    result = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
              "machine": platform.machine(), "image": "500x375", "rows": rows, "paper_ms": PAPER_MS}
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
