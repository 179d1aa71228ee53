"""Forward+backward throughput of RGNN (region gate, 5 scales) against the global baseline.

    python benchmarks/model_step.py [--quick] [--backbones small,vgg16] [--regions 50,200,1000]
                                    [--device cuda --amp] [--batch B --size H,W] [--out FILE]

Both run on the same backbone and the same input size (random weights, training mode): the
global step is `forward_global` (stage 1, the whole image pooled once); the RGNN step is
`forward` with T proposals per image plus the whole image (stage 4, everything trainable). A step
is forward, the balanced loss (eq. 6) and backward; no optimiser update. The target:
at T = 200 an RGNN step costs at most 1.5x a global step. For a backbone with frozen first layers
(efficientnet_lite0) the RGNN step is timed again with their features held (rgnn.nn.feature_cache: what
training does from the second epoch on). Prints a table, writes JSON.
"""
from __future__ import annotations

import argparse
import math
import platform
import time

import torch

from report import RESULTS, write_result
from rgnn.nn.losses import balanced_multilabel_loss
from rgnn.nn.model import RGNN, ModelConfig
from rgnn.train.schedule import set_trainable

NUM_CLASSES = 20  # VOC
TARGET_RATIO = 1.5  # RGNN step <= 1.5x global step at T = 200
# per backbone: (batch, height, width) -- the demo's regional input for small, a Fast R-CNN-like
# free-size input for VGG-16 (the paper's images are ~500x375 and Fast R-CNN resizes to 600)
SETTINGS = {"small": (8, 192, 256), "vgg16": (2, 480, 640), "resnet50": (2, 480, 640), "efficientnet_lite0": (8, 288, 384)}
QUICK = {"small": (8, 192, 256), "vgg16": (1, 384, 512), "resnet50": (1, 384, 512), "efficientnet_lite0": (4, 224, 288)}


def random_boxes(T: int, h: int, w: int, g: torch.Generator) -> torch.Tensor:
    """Tensor[T, 4] boxes inside an h x w image, areas log-uniform in [1/64, 1] of it (all 5 bins)."""
    area = torch.exp(torch.empty(T).uniform_(math.log(1 / 64), 0.0, generator=g)) * h * w
    aspect = torch.exp(torch.empty(T).uniform_(-0.7, 0.7, generator=g))
    bw = (area * aspect).sqrt().clamp(max=w)
    bh = (area / aspect).sqrt().clamp(max=h)
    x1 = torch.rand(T, generator=g) * (w - bw)
    y1 = torch.rand(T, generator=g) * (h - bh)
    return torch.stack([x1, y1, x1 + bw, y1 + bh], 1)  # (T, 4)


def time_pair(step_a, step_b, iters: int, warmup: int, device: torch.device) -> tuple[float, float]:
    """Fastest seconds of `step_a()` and of `step_b()`, run alternately `iters` times after `warmup`
    untimed rounds. Alternating puts both under the same load on a shared machine, and the minimum
    is the least disturbed run of each."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = [float("inf"), float("inf")]
    for i in range(warmup + iters):
        for k, step in enumerate((step_a, step_b)):
            sync()
            t = time.perf_counter()
            step()
            sync()
            if i >= warmup:
                best[k] = min(best[k], time.perf_counter() - t)
    return best[0], best[1]


def bench_backbone(name: str, regions: list[int], batch: int, h: int, w: int, iters: int, warmup: int,
                   device: torch.device = torch.device("cpu"), amp: bool = False) -> list[dict]:
    torch.manual_seed(0)
    model = RGNN(ModelConfig(num_classes=NUM_CLASSES, backbone=name, gate="region", scales=5)).to(device)
    model.train()
    set_trainable(model, "joint")
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, h, w, generator=g).to(device)
    sizes = torch.tensor([[h, w]] * batch, device=device)
    targets = (torch.rand(batch, NUM_CLASSES, generator=g) < 0.2).float().to(device)

    def step(forward):
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):  # as rgnn.train.engine on GPUs
            loss = balanced_multilabel_loss(forward(), targets)
        loss.backward()

    rows = []
    for T in regions:
        boxes = [random_boxes(T, h, w, g).to(device) for _ in range(batch)]
        t_global, t_rgnn = time_pair(lambda: step(lambda: model.forward_global(images)),
                                     lambda: step(lambda: model(images, sizes, boxes).logits), iters, warmup, device)
        rows.append({"backbone": name, "device": str(device), "amp": amp, "T": T, "batch": batch,
                     "height": h, "width": w,
                     "global_step_s": t_global, "rgnn_step_s": t_rgnn,
                     "global_images_per_s": batch / t_global, "rgnn_images_per_s": batch / t_rgnn,
                     "rgnn_over_global": t_rgnn / t_global, "global_over_rgnn": t_global / t_rgnn,
                     **held_front(model, lambda: step(lambda: model(images, sizes, boxes).logits), iters, warmup,
                                  device)})
        print_row(rows[-1])
    return rows


def held_front(model: RGNN, rgnn_step, iters: int, warmup: int, device: torch.device) -> dict:
    """For a backbone with a frozen front (rgnn.nn.feature_cache): the RGNN step with the front's features
    held, as from the second epoch of training on, timed against the step that computes them."""
    backbone = model.backbone
    backbone.use_cache(1 << 30)
    if backbone.cache is None:
        return {}
    held, backbone.cache = backbone.cache, None

    def with_cache(cache):
        backbone.cache = cache
        rgnn_step()

    t_computed, t_held = time_pair(lambda: with_cache(None), lambda: with_cache(held), iters, warmup + 1, device)
    backbone.cache = None
    return {"rgnn_held_front_step_s": t_held, "held_front_speedup": t_computed / t_held}


def print_row(r: dict) -> None:
    verdict = ""
    if r["T"] == 200:
        verdict = "  meets <=1.5x" if r["rgnn_over_global"] <= TARGET_RATIO else "  misses <=1.5x"
    print(f"{r['backbone']:>8} {r['batch']:>3}x{r['height']}x{r['width']:<4} {r['T']:>5} "
          f"{r['global_images_per_s']:>9.2f} {r['rgnn_images_per_s']:>9.2f} "
          f"{r['global_step_s'] * 1e3:>9.1f} {r['rgnn_step_s'] * 1e3:>9.1f} "
          f"{r['rgnn_over_global']:>7.2f} {r['global_over_rgnn']:>7.2f}{verdict}", flush=True)
    if "held_front_speedup" in r:
        print(f"{'':>29} RGNN step with the frozen front's features held: {r['rgnn_held_front_step_s'] * 1e3:.1f} "
              f"ms, {r['held_front_speedup']:.2f}x faster", flush=True)


HEADER = (f"{'backbone':>8} {'input':>13} {'T':>5} {'glob im/s':>9} {'RGNN im/s':>9} {'glob ms':>9} "
          f"{'RGNN ms':>9} {'R/G':>7} {'G/R':>7}")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--backbones", default="small,vgg16", help="comma-separated: small, vgg16, resnet50, efficientnet_lite0")
    p.add_argument("--regions", type=_ints, default=[50, 200, 1000], help="T values, comma-separated")
    p.add_argument("--iters", type=int, default=None,
                   help="timed steps of each kind per setting; the fastest counts (default 5, quick 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--quick", action="store_true", help="smaller VGG/ResNet input and batch, fewer steps")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast (what rgnn.train.engine does on GPUs)")
    p.add_argument("--batch", type=int, default=None, help="images per step (default per backbone)")
    p.add_argument("--size", type=_ints, default=None, help="H,W of the input (default per backbone)")
    p.add_argument("--out", default=str(RESULTS / "model_step.json"), help="JSON results")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    settings = QUICK if args.quick else SETTINGS
    iters = args.iters or (3 if args.quick else 5)
    names = args.backbones.split(",")
    for name in names:
        if name not in settings:
            raise ValueError(f"backbone {name!r}: expected one of {tuple(settings)}")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {where}, amp={args.amp}")
    print(HEADER)
    rows = []
    for name in names:
        batch, h, w = settings[name]
        batch = args.batch or batch
        h, w = args.size or (h, w)
        rows += bench_backbone(name, args.regions, batch, h, w, iters, args.warmup, device, args.amp)
    result = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": where, "quick": args.quick,
              "iters": iters, "target_rgnn_over_global_at_T200": TARGET_RATIO, "rows": rows}
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
