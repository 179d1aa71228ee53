"""Throughput of the proposal step: EdgeBoxes images/s on one core at VOC size.

    python benchmarks/proposals.py [--images N] [--size 500,375] [--edge-model FILE] [--no-photos]
                                   [--shard-images N] [--shard-actors 1,2] [--shard-cpus N] [--out FILE]

Proposals: `rgnn.data.proposals.EdgeBoxes` with the default `ProposalParams` on one core
(`cv2.setNumThreads(1)`), one image at a time, on images of the built-in synthetic set (drawn by
`rgnn.data.synthetic.make_image`, resized to --size, ground-truth boxes scaled with them); also on
the natural photos that matplotlib and scikit-learn ship (if installed), which have more texture
and so more gradient edges. Reports wall-clock and CPU (process) time per image, images/s, boxes
per image, and on the synthetic images the recall at IoU 0.5 and 0.7. The target: at least
10 images/s per core at 500x375 (the paper quotes about 200 ms per image for EdgeBoxes).

Shard job: the whole sharding job (`sharding.job.build_shards`: actor start, decoding,
proposals, tar writing, manifest) on --shard-images synthetic JPEGs at --size, on a local Ray of
--shard-cpus CPUs, with 1 and 2 actors (--shard-actors; 0: in this process, no Ray); end-to-end
images/s. The target: 2 actors at least 1.7x one actor on 2 cores.
Prints a table, writes JSON (one key per part of the benchmark). The tiny run of the tests:
`--images 2 --size 160,120 --no-photos --shard-images 4 --shard-actors 0`.
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from report import RESULTS, write_result
from rgnn.data.records import ImageRecord, LabeledSet
from rgnn.data.synthetic import CLASS_NAMES, category_id, make_image
from rgnn.data.proposals import EdgeBoxes, ProposalParams, proposal_recall

TARGET_IMAGES_PER_S = 10.0  # per core at 500x375
TARGET_SHARD_SPEEDUP = 1.7  # the shard job with 2 actors vs 1 actor, on 2 cores


def synthetic_images(n: int, size: tuple[int, int], seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """n synthetic-set images resized to size = (width, height): (uint8 [H, W, 3] RGB, float32 [G, 4] boxes)."""
    w, h = size
    out = []
    for i in range(n):
        img, objects = make_image(np.random.default_rng([seed, i]))
        sx, sy = w / img.shape[1], h / img.shape[0]
        gt = np.array([box for _, box in objects], np.float32).reshape(-1, 4) * np.float32([sx, sy, sx, sy])
        out.append((cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR), gt))
    return out


def sample_photos(size: tuple[int, int]) -> list[np.ndarray]:
    """The natural photos bundled with matplotlib and scikit-learn (those installed), resized to size."""
    paths = []
    try:
        import matplotlib
        paths.append(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg")
    except ImportError:
        pass
    try:
        import sklearn
        paths += [Path(sklearn.__file__).parent / "datasets" / "images" / n for n in ("china.jpg", "flower.jpg")]
    except ImportError:
        pass
    photos = []
    for p in paths:
        bgr = cv2.imread(str(p))
        if bgr is not None:
            photos.append(cv2.resize(bgr[:, :, ::-1], size, interpolation=cv2.INTER_AREA))
    return photos


def bench_proposals(images: list[np.ndarray], gt_boxes: list[np.ndarray] | None = None,
                    params: ProposalParams = ProposalParams(), edge_model: str | None = None,
                    repeat: int = 1) -> dict:
    """Time `EdgeBoxes(params, edge_model)` on one core over `images` (each `repeat` times, after
    one untimed warm-up call); with `gt_boxes`, also the recall at IoU 0.5 and 0.7.

    Returns:
        dict: images, repeat, height, width, ms_per_image (wall), cpu_ms_per_image, images_per_s,
        boxes_per_image, recall_iou50, recall_iou70 (None without gt_boxes).
    """
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        proposer = EdgeBoxes(params, edge_model)
        proposer(images[0])
        wall = cpu = 0.0
        for _ in range(repeat):
            boxes = []  # of the last pass
            for img in images:
                t, c = time.perf_counter(), time.process_time()
                b, _ = proposer(img)
                wall += time.perf_counter() - t
                cpu += time.process_time() - c
                boxes.append(b)
    finally:
        cv2.setNumThreads(threads)
    n = len(images) * repeat
    recall = {thr: None if gt_boxes is None else proposal_recall(boxes, gt_boxes, thr) for thr in (0.5, 0.7)}
    h, w = images[0].shape[:2]
    return {"images": len(images), "repeat": repeat, "height": h, "width": w,
            "ms_per_image": 1e3 * wall / n, "cpu_ms_per_image": 1e3 * cpu / n, "images_per_s": n / wall,
            "boxes_per_image": float(np.mean([len(b) for b in boxes])),
            "recall_iou50": recall[0.5], "recall_iou70": recall[0.7]}


HEADER = f"{'images':>22} {'size':>9} {'ms/img':>8} {'cpu ms':>8} {'img/s':>7} {'boxes':>6} {'R@.5':>5} {'R@.7':>5}"


def print_row(name: str, r: dict) -> None:
    rec = "".join(f" {r[k]:>5.2f}" if r[k] is not None else f" {'-':>5}" for k in ("recall_iou50", "recall_iou70"))
    print(f"{name:>22} {r['width']:>4}x{r['height']:<4} {r['ms_per_image']:>8.1f} {r['cpu_ms_per_image']:>8.1f} "
          f"{r['images_per_s']:>7.1f} {r['boxes_per_image']:>6.0f}{rec}", flush=True)


def _size(text: str) -> tuple[int, int]:
    w, h = (int(x) for x in text.split(","))
    return w, h


def _counts(text: str) -> tuple[int, ...]:
    counts = tuple(sorted({int(x) for x in text.split(",")}))
    if counts[0] < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: actor counts must be >= 0")
    return counts


def shard_job_set(folder: Path, n: int, size: tuple[int, int], seed: int = 0) -> LabeledSet:
    """`synthetic_images` written as JPEG files under `folder`, as the LabeledSet the job reads."""
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i, (img, gt) in enumerate(synthetic_images(n, size, seed)):
        path = folder / f"{i:06d}.jpg"
        cv2.imwrite(str(path), img[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
        records.append(ImageRecord(i, str(path), size[0], size[1], [], gt,
                                   np.zeros(len(gt), np.int64), np.zeros(len(gt), bool)))
    return LabeledSet("bench/train", list(CLASS_NAMES), records, [category_id(c) for c in range(len(CLASS_NAMES))])


def bench_shard_job(n_images: int = 384, size: tuple[int, int] = (500, 375), actor_counts: tuple[int, ...] = (1, 2),
                    images_per_shard: int = 8, params: ProposalParams = ProposalParams(),
                    edge_model: str | None = None, num_cpus: int = 2, seed: int = 0) -> dict:
    """End-to-end images/s of the sharding job for each actor count, on a local Ray of num_cpus CPUs
    (a count of 0: in this process, without Ray).

    A shard is the job's unit of parallel work, so shards are kept small here (`images_per_shard`).
    An untimed 2-image job first warms Ray's worker pool and the page cache.

    Returns:
        dict: n_images, width, height, images_per_shard, ray_cpus (None when every count is 0:
        no Ray), actors {count: {seconds, images_per_s}}, speedup (most actors vs fewest),
        target_speedup.
    """
    import ray  # noqa: PLC0415 (only this part of the benchmark needs Ray)
    from sharding.ray_setup import init_ray  # noqa: PLC0415
    from sharding.job import build_shards, plan_shards  # noqa: PLC0415

    on_ray = any(actor_counts)
    started = on_ray and not ray.is_initialized()
    if on_ray:
        init_ray(num_cpus=num_cpus, include_dashboard=False)
    runs = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            labeled = shard_job_set(Path(tmp) / "images", n_images, size, seed)
            want = max(n_images // images_per_shard, 1)
            shard_size = next(b for b in range(1 << 12, 1 << 40, 1 << 12)
                              if len(plan_shards(labeled.records, "x", b, params.max_boxes)) <= want)
            build_shards(labeled, Path(tmp) / "warmup", actors=max(actor_counts), params=params,
                         edge_model=edge_model, limit=2, shard_size=1, progress=False)
            for n in actor_counts:
                t0 = time.perf_counter()
                build_shards(labeled, Path(tmp) / f"actors{n}", actors=n, params=params, edge_model=edge_model,
                             shard_size=shard_size, progress=False)
                seconds = time.perf_counter() - t0
                runs[n] = {"seconds": seconds, "images_per_s": n_images / seconds}
    finally:
        if started:
            ray.shutdown()
    return {"n_images": n_images, "width": size[0], "height": size[1], "images_per_shard": images_per_shard,
            "ray_cpus": num_cpus if on_ray else None, "actors": runs,
            "speedup": runs[max(actor_counts)]["images_per_s"] / runs[min(actor_counts)]["images_per_s"],
            "target_speedup": TARGET_SHARD_SPEEDUP}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--images", type=int, default=20, help="synthetic images to time")
    p.add_argument("--repeat", type=int, default=1, help="passes over the images")
    p.add_argument("--size", type=_size, default="500,375", help="W,H the images are resized to (VOC size)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic images")
    p.add_argument("--edge-model", default=None, help="structured-edge model.yml.gz; none: gradient edges")
    p.add_argument("--no-photos", action="store_true", help="skip the bundled natural photos")
    p.add_argument("--shard-images", type=int, default=384, help="images for the shard job (0: skip it)")
    p.add_argument("--shard-actors", type=_counts, default="1,2",
                   help="the shard job's actor counts, comma-separated (0: in this process, no Ray)")
    p.add_argument("--shard-cpus", type=int, default=2, help="CPUs of the local Ray the shard job runs on")
    p.add_argument("--out", default=str(RESULTS / "proposals.json"), help="JSON results")
    args = p.parse_args(argv)
    if args.images < 1 or args.repeat < 1:
        raise ValueError(f"--images {args.images} and --repeat {args.repeat}: expected >= 1")

    params = ProposalParams()
    print(f"opencv {cv2.__version__}, 1 thread, {platform.processor() or platform.machine()}, "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    print(HEADER)
    synthetic = synthetic_images(args.images, args.size, args.seed)
    rows = {"synthetic": bench_proposals([img for img, _ in synthetic], [gt for _, gt in synthetic], params,
                                         args.edge_model, args.repeat)}
    print_row("synthetic", rows["synthetic"])
    photos = [] if args.no_photos else sample_photos(args.size)
    if photos:
        rows["photos"] = bench_proposals(photos, None, params, args.edge_model, args.repeat)
        print_row(f"photos ({len(photos)} bundled)", rows["photos"])
    verdict = "meets" if rows["synthetic"]["images_per_s"] >= TARGET_IMAGES_PER_S else "misses"
    print(f"synthetic: {rows['synthetic']['images_per_s']:.1f} images/s on one core, {verdict} the target "
          f"of {TARGET_IMAGES_PER_S:.0f}")

    result = {"proposals": {"opencv": cv2.__version__, "threads": 1, "cpu": platform.processor() or platform.machine(),
                            "load_average": os.getloadavg()[0], "cores": os.cpu_count(),
                            "edge_model": args.edge_model, "params": params.to_dict(),
                            "target_images_per_s": TARGET_IMAGES_PER_S, "rows": rows}}
    if args.shard_images > 0:
        job = bench_shard_job(args.shard_images, args.size, args.shard_actors, params=params,
                              edge_model=args.edge_model, num_cpus=args.shard_cpus, seed=args.seed)
        for n, r in job["actors"].items():
            where = f"{n} actor(s) on {job['ray_cpus']} CPUs" if n else "in this process"
            print(f"shard job, {where}: {job['n_images']} images "
                  f"{job['width']}x{job['height']} in {r['seconds']:.3g} s, {r['images_per_s']:.1f} images/s")
        if len(job["actors"]) > 1:
            verdict = "meets" if job["speedup"] >= TARGET_SHARD_SPEEDUP else "misses"
            print(f"shard job: {max(job['actors'])} actors {job['speedup']:.2f}x {min(job['actors'])} actor(s), "
                  f"{verdict} the target of {TARGET_SHARD_SPEEDUP}x")
        result["shard_job"] = {**job, "load_average": os.getloadavg()[0]}
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
