"""One RGNN training step at the paper's scale: images/s and peak memory in fp32 and bf16, in NCHW and
channels-last layout, against the global step on the same input.

    python benchmarks/gpu_step.py [--device cuda] [--precisions fp32,bf16]
                                  [--memory-formats contiguous,channels_last] [--setting paper|builtin|quick]
                                  [--out FILE]

The step is the engine's own (`rgnn.train.engine.train_one_epoch` on one batch): the joint stage's
forward, eq. 9 (eq. 6 + lambda eq. 7 with eq. 8's targets), backward and Adam, VGG-16 with region
gates and 5 scales at shorter side 600 (600 x 800 images), T = 500 proposals, 2 images per GPU
(section 4.2). The reference is the global stage's step (stage 1: whole image, fc8, eq. 6) on the
same images. Peak memory is CUDA's max allocated per setting (not measured on CPUs). The layout
is the model's (`rgnn.train.engine.memory_format`: convolutions follow their weights). `--setting builtin`
is the small CNN at the built-in set's input (batch 16, 192 x 256, T = 128: what a CPU worker trains);
`--setting quick` (CI, on the CPU) the small CNN at 96 x 128, T = 16, one timed step: a check that the
script works, not a figure. Random weights and inputs: speed does not depend on them.
"""
from __future__ import annotations

import argparse
import platform

import torch

from model_step import random_boxes, time_pair
from report import RESULTS, write_result
from rgnn.data.transforms import Batch
from rgnn.train.engine import MEMORY_FORMATS, PRECISIONS, StageModel, StepOptions, memory_format, train_one_epoch
from rgnn.nn.model import RGNN, ModelConfig
from rgnn.train.schedule import set_trainable

NUM_CLASSES = 80  # COCO
SETTINGS = {"paper": dict(backbone="vgg16", batch=2, height=600, width=800, regions=500, iters=5),
            "builtin": dict(backbone="small", batch=16, height=192, width=256, regions=128, iters=5),
            "quick": dict(backbone="small", batch=2, height=96, width=128, regions=16, iters=1)}


def make_batch(batch: int, h: int, w: int, T: int, device: torch.device) -> Batch:
    g = torch.Generator().manual_seed(0)
    gt = [random_boxes(3, h, w, g) for _ in range(batch)]
    return Batch(images=torch.randn(batch, 3, h, w, generator=g), image_sizes=torch.tensor([[h, w]] * batch),
                 boxes=[torch.cat([random_boxes(T - 3, h, w, g), b]) for b in gt],  # some proposals are objects
                 targets=(torch.rand(batch, NUM_CLASSES, generator=g) < 0.05).float(),
                 ignore=torch.zeros(batch, NUM_CLASSES, dtype=torch.bool), gt_boxes=gt,
                 gt_classes=[torch.randint(NUM_CLASSES, (3,), generator=g) for _ in range(batch)],
                 ids=list(range(batch))).to(device)


def bench(s: dict, precision: str, layout: str, iters: int, warmup: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = RGNN(ModelConfig(num_classes=NUM_CLASSES, backbone=s["backbone"], gate="region", scales=5))
    model.to(device, memory_format=memory_format(layout))
    batch = make_batch(s["batch"], s["height"], s["width"], s["regions"], device)
    optimizers = {stage: torch.optim.Adam(set_trainable(model, stage), lr=1e-5) for stage in ("global", "joint")}
    peaks = {}

    def step(stage: str):
        set_trainable(model, stage)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        train_one_epoch(StageModel(model, stage), [batch], optimizers[stage], stage, NUM_CLASSES, device,
                        StepOptions(precision=precision), lam_at=lambda _: 0.5)
        if device.type == "cuda":
            peaks[stage] = torch.cuda.max_memory_allocated(device) / 2 ** 30

    t_global, t_joint = time_pair(lambda: step("global"), lambda: step("joint"), iters, warmup, device)
    row = {**s, "precision": precision, "memory_format": layout, "device": str(device), "global_step_s": t_global, "rgnn_step_s": t_joint,
           "global_images_per_s": s["batch"] / t_global, "rgnn_images_per_s": s["batch"] / t_joint,
           "rgnn_over_global": t_joint / t_global, "global_peak_gib": peaks.get("global"),
           "rgnn_peak_gib": peaks.get("joint")}
    mem = "-" if row["rgnn_peak_gib"] is None else f"{row['global_peak_gib']:.2f} / {row['rgnn_peak_gib']:.2f}"
    print(f"{s['backbone']:>7} {precision:>5} {layout:>13} {s['batch']}x{s['height']}x{s['width']} T={s['regions']:<4} "
          f"global {row['global_images_per_s']:7.2f} im/s  RGNN {row['rgnn_images_per_s']:7.2f} im/s  "
          f"RGNN/global {row['rgnn_over_global']:5.2f}x  peak GiB (global / RGNN) {mem}", flush=True)
    return row


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--precisions", default="fp32,bf16", help=f"comma-separated, of {PRECISIONS[1:]}")
    p.add_argument("--memory-formats", default="contiguous,channels_last",
                   help=f"comma-separated, of {MEMORY_FORMATS}")
    p.add_argument("--setting", choices=tuple(SETTINGS), default="paper",
                   help="paper: VGG-16, 2 x 600 x 800, T = 500; builtin: the small CNN, 16 x 192 x 256, T = 128; "
                        "quick (CI): the small CNN, 2 x 96 x 128, T = 16, 1 step")
    p.add_argument("--iters", type=int, help="timed steps per setting, the fastest counts (default 5, quick 1)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--out", default=str(RESULTS / "gpu_step.json"), help="JSON results")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    setting = SETTINGS[args.setting]
    precisions, layouts = args.precisions.split(","), args.memory_formats.split(",")
    for name, values, allowed in (("precision", precisions, PRECISIONS[1:]), ("memory format", layouts, MEMORY_FORMATS)):
        for value in values:
            if value not in allowed:
                raise ValueError(f"{name} {value!r}: expected some of {allowed}")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"torch {torch.__version__}, {where}")
    rows = [bench(setting, precision, layout, args.iters or setting["iters"], args.warmup, device)
            for precision in precisions for layout in layouts]
    result = {"torch": torch.__version__, "device": where, "setting": args.setting, "rows": rows}
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
