"""EdgeBoxes proposals on a Ray actor pool, written as WebDataset shards.

    python sharding/build_shards.py --coco-root DIR --split train2017 --out SHARDS [options]
    python sharding/build_shards.py --voc-root DIR --voc-split trainval --out SHARDS [options]
    python sharding/build_shards.py --out SHARDS      # the built-in synthetic set

Step 1 of the paper's pipeline (section 3: "We adopt EdgeBox for region proposal generation"), done
once ahead of training. Writes SHARDS/<split>/<split>-NNNNNN.tar and SHARDS/<split>/manifest.json.

How it works (plan, actor pool, manifest, resume, skipped images): sharding/job.py.

Ray: `--address` joins that cluster; without it, RAY_ADDRESS or a running local cluster is joined,
else a local Ray is started (with `--num-cpus` CPUs if given). `--actors 0` runs without Ray, in
this process (debugging, tiny sets). On a multi-node cluster `--out` must be a path every node
can write (a shared file system) or an object-store URI (`s3://bucket/prefix`, credentials and
endpoint from the standard AWS environment, see rgnn/io/storage.py), and the job should be submitted with
`ray job submit --working-dir . -- python sharding/build_shards.py ...` so that every node has this code.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import time
from pathlib import Path

from rgnn.cli import user_errors
from rgnn.data.proposals import ProposalParams
from rgnn.data.shardformat import MANIFEST, read_manifest
from sharding.job import DEFAULT_SHARD_SIZE, build_shards
from sharding.ray_setup import init_ray


def parse_size(text: str) -> int:
    """'1073741824', '1G', '500M', '64k' -> bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgGtT]?)[iI]?[bB]?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size in bytes: {text!r} (e.g. 1073741824, 1G, 500M)")
    return int(m.group(1)) << (10 * " KMGT".index(m.group(2).upper() or " "))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python sharding/build_shards.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("input (one of; neither: the built-in synthetic set)")
    src.add_argument("--coco-root", help="COCO root holding annotations/instances_<split>.json and <split>/")
    src.add_argument("--split", default="train2017", help="COCO (or synthetic) split (default train2017)")
    src.add_argument("--voc-root", help="VOCdevkit, or VOCdevkit/VOC2007 itself")
    src.add_argument("--voc-split", default="trainval", help="VOC image set (default trainval)")
    src.add_argument("--voc-year", help="VOC year when --voc-root holds several (e.g. 2007)")
    src.add_argument("--synthetic-dir", default="~/.cache/rgnn/synthetic-200-50-seed0",
                     help="where the synthetic set is generated if missing (default %(default)s)")
    out = p.add_argument_group("output")
    out.add_argument("--out", default="shards", help="SHARDS folder or object-store URI (s3://bucket/prefix); "
                                                     "writes SHARDS/<split>/ (default ./shards)")
    out.add_argument("--shard-size", type=parse_size, default=DEFAULT_SHARD_SIZE,
                     help="target shard size in bytes, suffixes K/M/G allowed (default 1G); a shard "
                          "is the unit of parallel work, so the job uses at most as many actors as shards")
    out.add_argument("--limit", type=int, help="only the first N images (smoke runs)")
    prop = p.add_argument_group("proposals (EdgeBoxes)")
    prop.add_argument("--max-boxes", type=int, default=ProposalParams().max_boxes,
                      help="T, proposals kept per image (default %(default)s)")
    prop.add_argument("--edge-model", help="OpenCV structured-edge model (model.yml.gz) for the paper's "
                                           "edge maps; default: gradient edges, no file needed")
    cl = p.add_argument_group("Ray")
    cl.add_argument("--actors", type=int, help="actors (default: one per CPU of the cluster; 0: no Ray, "
                                               "run in this process)")
    cl.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a running "
                                      "local cluster, else a new local Ray)")
    cl.add_argument("--num-cpus", type=int, help="CPUs of a new local Ray (default: all of this machine)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> None:
    p = build_parser()
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if a.coco_root and a.voc_root:
        p.error("give --coco-root or --voc-root, not both")
    with user_errors():  # a bad input names itself, no traceback
        labeled = read_input(a)
        params = dataclasses.replace(ProposalParams(), max_boxes=a.max_boxes)
        if a.actors != 0:
            init_ray(a.address, a.num_cpus)
        t0 = time.time()
        split_dir = build_shards(labeled, a.out, actors=a.actors, params=params, shard_size=a.shard_size,
                                 edge_model=a.edge_model, limit=a.limit, progress=not a.no_progress)
        m = read_manifest(split_dir)
        print(f"{split_dir}: {m['samples']} samples in {len(m['shards'])} shards, {len(m['skipped'])} inputs "
              f"skipped (listed in {MANIFEST}), {time.time() - t0:.1f} s")
    print(recall_line(m))


def read_input(a: argparse.Namespace):
    """The LabeledSet the flags name: a VOC image set, a COCO split, or the synthetic set (generated if missing)."""
    if a.voc_root:
        from rgnn.data.voc import read_voc  # noqa: PLC0415

        return read_voc(a.voc_root, a.voc_split, a.voc_year)
    from rgnn.data.coco import read_coco  # noqa: PLC0415

    root = a.coco_root
    if root is None:
        from rgnn.data.synthetic import generate  # noqa: PLC0415

        root = Path(a.synthetic_dir).expanduser()
        if not (root / "annotations" / f"instances_{a.split}.json").is_file():
            generate(root)
    return read_coco(root, a.split)


def recall_line(manifest: dict) -> str:
    """The manifest's proposal recall in one line (what training logs to MLflow as data/recall...)."""
    parts = [f"top {k}: {r['recall@0.5']} at IoU 0.5, {r['recall@0.7']} at 0.7 ({r['objects']} objects)"
             for k, r in manifest.get("proposal_recall", {}).items() if r["objects"]]
    return "proposal recall, " + ("; ".join(parts) if parts else "no annotated objects")


if __name__ == "__main__":
    main()
