"""Per-image prediction latency, split into EdgeBoxes proposals and the network.

    python benchmarks/inference.py [--backbones small,vgg16] [--regions 500] [--images 5] [--device cpu]
                                   [--threads N] [--out FILE]

Exactly what `rgnn.infer.predict` does for one image of VOC size (500x375, a synthetic picture), through
its `Predictor`: proposals (gradient edges + EdgeBoxes on the original image, 2T searched, the best
T kept), then the network: resize to the training input (shorter side 600, longer <= 1000 for
VGG-16 as in the paper's Fast R-CNN setting; 192 for the small CNN), normalise, the RGNN forward
pass with region gates and 5 scales, batch of one, no gradient. The weights are random (timing
only: the cost does not depend on their values). The paper reports 430 ms per image on a GPU
(TitanX), 200 ms of it EdgeBoxes. Median over --images images after one untimed warm-up image, for
each thread count of --threads: on a machine shared with other jobs, a parallel op waits for its
slowest thread, and 2 threads on 2 busy cores can be many times slower than 1.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import time

import cv2
import numpy as np
import torch

from report import RESULTS, write_result
from rgnn.data.synthetic import make_image
from rgnn.train.config import INPUTS
from rgnn.data.transforms import PAPER_INPUT, InputConfig
from rgnn.data.voc import VOC_CLASSES
from rgnn.nn.model import RGNN, ModelConfig
from rgnn.infer.predict import Predictor

# the network's input per backbone: the recipe's (rgnn.train.config.INPUTS) for the small CNN and
# EfficientNet-Lite0, the paper's for the others
INPUT = {name: InputConfig(INPUTS[name]["image_size"], INPUTS[name]["max_size"], INPUTS[name]["global_size"])
         for name in ("small", "efficientnet_lite0")}
INPUT.update(vgg16=PAPER_INPUT, resnet50=PAPER_INPUT)
PAPER_MS = {"total_gpu": 430, "edgeboxes": 200}


def voc_sized_images(n: int, seed: int = 0) -> list[np.ndarray]:
    """n synthetic RGB pictures resized to 500x375 (a typical VOC image)."""
    rng = np.random.default_rng(seed)
    return [cv2.resize(make_image(rng)[0], (500, 375), interpolation=cv2.INTER_LINEAR) for _ in range(n)]


def time_backbone(name: str, images: list[np.ndarray], regions: int, device: torch.device) -> dict:
    """Median milliseconds per image of `Predictor.propose` and of the network (`Predictor.__call__`
    on the proposals), with T = `regions`."""
    torch.manual_seed(0)
    inputs = dataclasses.replace(INPUT[name], max_regions=regions)
    predictor = Predictor(RGNN(ModelConfig(num_classes=len(VOC_CLASSES), backbone=name)), list(VOC_CLASSES),
                          "joint", inputs, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t_prop, t_net, kept = [], [], []
    for i, image in enumerate([images[0], *images]):  # the first is a warm-up
        t0 = time.perf_counter()
        proposals = predictor.propose(image)
        t1 = time.perf_counter()
        predictor([image], [proposals])
        sync()
        t2 = time.perf_counter()
        if i:
            t_prop.append(t1 - t0)
            t_net.append(t2 - t1)
            kept.append(min(len(proposals[0]), regions))
    prop, net = 1000 * statistics.median(t_prop), 1000 * statistics.median(t_net)
    return {"backbone": name, "input_shorter_side": inputs.image_size, "regions": regions,
            "regions_found": round(statistics.mean(kept), 1), "proposals_ms": round(prop, 1),
            "network_ms": round(net, 1), "total_ms": round(prop + net, 1)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--backbones", default="small,vgg16", help=f"comma-separated: {', '.join(INPUT)}")
    p.add_argument("--regions", type=int, default=500, help="T proposals per image (the paper's setting)")
    p.add_argument("--images", type=int, default=5, help="timed images")
    p.add_argument("--device", default="cpu", help="cpu or cuda (the network only; EdgeBoxes runs on the CPU)")
    p.add_argument("--threads", default=f"1,{torch.get_num_threads()}",
                   help="comma-separated torch and OpenCV CPU thread counts to time (default: 1 and torch's default)")
    p.add_argument("--out", default=str(RESULTS / "inference.json"), help="JSON results")
    args = p.parse_args(argv)
    names = args.backbones.split(",")
    for name in names:
        if name not in INPUT:
            raise ValueError(f"backbone {name!r}: expected one of {tuple(INPUT)}")
    if args.images < 1 or args.regions < 0:
        raise ValueError(f"--images {args.images} must be >= 1 and --regions {args.regions} >= 0")
    device = torch.device(args.device)
    images = voc_sized_images(args.images)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"per image, 500x375, T={args.regions}, network on {device.type} ({where}); RANDOM-INIT weights "
          f"(timing only), median of {args.images} images:")
    rows = []
    for threads in sorted({int(t) for t in args.threads.split(",")}):
        torch.set_num_threads(threads)
        cv2.setNumThreads(threads)
        for name in names:
            r = {"threads": threads, **time_backbone(name, images, args.regions, device)}
            rows.append(r)
            print(f"  {threads} thread(s) {r['backbone']:>8} (shorter side {r['input_shorter_side']}, "
                  f"{r['regions_found']:.0f} regions): proposals {r['proposals_ms']:7.1f} ms  "
                  f"network {r['network_ms']:7.1f} ms  total {r['total_ms']:7.1f} ms", flush=True)
    print(f"  the paper (TitanX GPU, VGG-16): {PAPER_MS['total_gpu']} ms per image, "
          f"{PAPER_MS['edgeboxes']} ms of it EdgeBoxes")
    result = {"torch": torch.__version__, "opencv": cv2.__version__, "cpus": os.cpu_count(),
              "load_average": os.getloadavg()[0], "device": where, "image": "500x375", "weights": "random init",
              "images": args.images, "rows": rows, "paper_ms": PAPER_MS}
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
