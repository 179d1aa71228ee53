"""The Ray sharding job (sharding/build_shards.py): actors, manifest, resume, faults, multi-node."""
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray


from rgnn.data import shards  # noqa: E402
from rgnn.data.coco import read_coco  # noqa: E402
from rgnn.data.proposals import ProposalParams  # noqa: E402
from sharding.ray_setup import init_ray  # noqa: E402
from sharding.job import build_shards, plan_shards  # noqa: E402
from test_shards import tar_samples  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ProposalParams(max_boxes=100)


@pytest.fixture(scope="module")
def source(synthetic_root, tmp_path_factory):
    """A private copy of the synthetic train split (24 images), which tests may damage."""
    root = tmp_path_factory.mktemp("source")
    shutil.copytree(synthetic_root / "annotations", root / "annotations")
    shutil.copytree(synthetic_root / "train2017", root / "train2017")
    return root


def _shard_size(records, n_shards):
    """A shard size that gives about n_shards shards."""
    for size in range(5_000, 2_000_000, 1_000):
        if len(plan_shards(records, "x", size, PARAMS.max_boxes)) <= n_shards:
            return size
    raise AssertionError


def _all_samples(split_dir):
    m = shards.read_manifest(split_dir)
    return {k: v for e in m["shards"] for k, v in tar_samples(Path(split_dir) / e["name"]).items()}


@pytest.mark.ray
def test_two_node_cluster_gets_actors_on_both_nodes(source, tmp_path, monkeypatch):
    """A 2-node cluster simulated on this machine (1 CPU each): the pool spreads over both."""
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the nodes' workers import sharding/ from this checkout
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        labeled = read_coco(source, "train2017")
        split_dir = build_shards(labeled, tmp_path, actors=2, params=PARAMS, limit=8,  # joins the cluster it names
                                 shard_size=_shard_size(labeled.records[:8], 4), progress=False,
                                 address=cluster.address)
        nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert len(nodes) == 2
        m = shards.read_manifest(split_dir)
        assert m["complete"] and m["samples"] == 8
        assert m["job"]["actors"] == 2 and set(m["job"]["nodes"]) == nodes
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def local_ray():
    if ray.is_initialized():
        ray.shutdown()
    init_ray(num_cpus=2, include_dashboard=False)  # a new local Ray whose workers import sharding/
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def job(local_ray, source, tmp_path_factory):
    labeled = read_coco(source, "train2017")
    out = tmp_path_factory.mktemp("shards")
    size = _shard_size(labeled.records, 6)
    split_dir = build_shards(labeled, out, actors=2, params=PARAMS, shard_size=size, progress=False)
    return split_dir, labeled, out, size


@pytest.mark.ray
def test_job_with_two_actors(job):
    split_dir, labeled, _, _ = job
    m = shards.read_manifest(split_dir)
    assert m["complete"] and m["job"]["actors"] == 2 and len(m["shards"]) >= 4
    assert m["samples"] == m["records"] - len(m["skipped"]) == len(labeled.records) == 24
    shards.verify_shards(split_dir)
    samples = _all_samples(split_dir)
    assert len(samples) == 24
    for rec in labeled.records:
        s = samples[str(rec.image_id)]
        assert s["jpg"] == Path(rec.path).read_bytes()
        assert json.loads(s["json"])["id"] == rec.image_id


@pytest.mark.ray
def test_resume_rebuilds_only_missing_or_corrupt_shards(job):
    split_dir, labeled, out, size = job
    before = shards.read_manifest(split_dir)
    names = [e["name"] for e in before["shards"]]
    mtimes = {n: (split_dir / n).stat().st_mtime_ns for n in names}
    time.sleep(0.01)
    (split_dir / names[1]).unlink()
    corrupt = bytearray((split_dir / names[2]).read_bytes())
    corrupt[600] ^= 0xFF
    (split_dir / names[2]).write_bytes(bytes(corrupt))
    mtimes[names[2]] = (split_dir / names[2]).stat().st_mtime_ns

    build_shards(labeled, out, actors=2, params=PARAMS, shard_size=size, progress=False)
    after = shards.read_manifest(split_dir)
    assert after["complete"] and after["shards"] == before["shards"]  # same bytes, same checksums
    for n in names:
        changed = (split_dir / n).stat().st_mtime_ns != mtimes[n]
        assert changed == (n in names[1:3]), n
    shards.verify_shards(split_dir)


@pytest.mark.ray
def test_bad_inputs_are_skipped_and_listed(local_ray, source, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(source, src)
    labeled = read_coco(src, "train2017")
    corrupt, missing = labeled.records[3].path, labeled.records[10].path
    data = Path(corrupt).read_bytes()
    Path(corrupt).write_bytes(data[: len(data) // 3])  # a truncated JPEG
    Path(missing).unlink()  # vanished after the annotations were read
    split_dir = build_shards(labeled, tmp_path / "out", actors=2, params=PARAMS,
                             shard_size=_shard_size(labeled.records, 4), progress=False)
    m = shards.read_manifest(split_dir)
    assert m["complete"] and m["samples"] == m["records"] - 2 == len(labeled.records) - 2
    reasons = {s["image"]: s["reason"] for s in m["skipped"]}
    assert set(reasons) == {corrupt, missing}
    assert reasons[missing] == "image file missing"
    assert "cannot decode" in reasons[corrupt] and corrupt in reasons[corrupt]
    assert {str(labeled.records[i].image_id) for i in (3, 10)}.isdisjoint(_all_samples(split_dir))


@pytest.mark.ray
def test_actor_killed_mid_run(local_ray, source, tmp_path):
    """One image per shard; an actor is killed once the first shard is out: its shard is redone."""
    labeled = read_coco(source, "train2017")
    split_dir = tmp_path / "train2017"
    result = {}

    def run():
        try:
            result["dir"] = build_shards(labeled, tmp_path, actors=2, params=PARAMS, shard_size=1, progress=False)
        except BaseException as e:  # handed to the test thread
            result["error"] = e

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.monotonic() + 120
    while not list(split_dir.glob("*.tar")) and time.monotonic() < deadline:
        time.sleep(0.005)
    victims = [n for n in ray.util.list_named_actors() if n.startswith("rgnn-shards-train2017-")]
    assert victims and worker.is_alive()
    ray.kill(ray.get_actor(victims[0]))
    killed_mid_run = worker.is_alive() and len(list(split_dir.glob("*.tar"))) < 24
    worker.join(timeout=180)
    assert "error" not in result, result.get("error")
    assert killed_mid_run
    m = shards.read_manifest(result["dir"])
    assert m["complete"] and m["samples"] == 24 and len(m["shards"]) == 24
    assert m["job"]["resubmitted"]  # the dead actor's shard went to another actor
    assert sorted(_all_samples(split_dir)) == sorted(str(r.image_id) for r in labeled.records)
    shards.verify_shards(split_dir)


def test_cli_help_and_inline_run(source, tmp_path):
    """The CLI documents every flag and runs end to end (here without Ray: --actors 0)."""
    script = str(ROOT / "sharding" / "build_shards.py")
    text = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, check=True).stdout
    for flag in ("--coco-root", "--split", "--voc-root", "--voc-split", "--out", "--actors", "--max-boxes",
                 "--shard-size", "--edge-model", "--limit", "--address", "--num-cpus"):
        assert flag in text
    run = subprocess.run([sys.executable, script, "--coco-root", str(source), "--split", "train2017",
                          "--out", str(tmp_path), "--actors", "0", "--limit", "2", "--max-boxes", "20",
                          "--shard-size", "1K", "--no-progress"], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    m = shards.read_manifest(tmp_path / "train2017")
    assert m["complete"] and m["samples"] == 2 and len(m["shards"]) == 2 and m["proposals"]["max_boxes"] == 20


def _script(*args, env=None, cwd=None):
    """`python sharding/build_shards.py ARGS` as a user runs it: a script, so its own module is `__main__`."""
    run = subprocess.run([sys.executable, str(ROOT / "sharding" / "build_shards.py"), *args, "--no-progress"],
                         capture_output=True, text=True, env=env, cwd=cwd, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout + run.stderr


@pytest.mark.ray
def test_the_script_with_two_actors_builds_resumes_and_rebuilds_relabelled_shards(source, tmp_path, s3):
    """The README's command with Ray actors: a script's classes are `__main__.*`, which Ray pickles by
    value; the ones it ships must come from an importable module (a frozen dataclass with a
    cached_property holds an RLock on Python < 3.12 and cannot be pickled by value)."""
    root = tmp_path / "coco"
    shutil.copytree(source, root)
    size = str(_shard_size(read_coco(root, "train2017").records, 4))
    args = ["--coco-root", str(root), "--split", "train2017", "--actors", "2", "--max-boxes", "20",
            "--shard-size", size, "--num-cpus", "2"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    _script(*args, "--out", str(tmp_path / "out"), env=env, cwd=tmp_path)
    split_dir = tmp_path / "out" / "train2017"
    m = shards.read_manifest(split_dir)
    assert m["complete"] and m["job"]["actors"] == 2 and len(m["shards"]) >= 3
    shards.verify_shards(split_dir)
    before = {e["name"]: e for e in m["shards"]}

    log = _script(*args, "--out", str(tmp_path / "out"), env=env, cwd=tmp_path)
    assert f"keeping {len(before)} verified shards, building 0" in log
    assert shards.read_manifest(split_dir)["shards"] == m["shards"]

    ann_file = root / "annotations" / "instances_train2017.json"
    ann = json.loads(ann_file.read_text())
    relabelled = ann["annotations"][0]
    others = [c["id"] for c in ann["categories"] if c["id"] != relabelled["category_id"]]
    relabelled["category_id"] = others[0]
    ann_file.write_text(json.dumps(ann))
    image = next(i for i in ann["images"] if i["id"] == relabelled["image_id"])
    victim = next(e["name"] for e in m["shards"]
                  if str(relabelled["image_id"]) in tar_samples(split_dir / e["name"]))
    log = _script(*args, "--out", str(tmp_path / "out"), env=env, cwd=tmp_path)
    assert f"keeping {len(before) - 1} verified shards, building 1" in log and victim in log
    after = {e["name"]: e for e in shards.read_manifest(split_dir)["shards"]}
    assert sorted(after) == sorted(before) and after[victim]["sha256"] != before[victim]["sha256"]
    assert all(after[n] == before[n] for n in before if n != victim)
    sample = json.loads(tar_samples(split_dir / victim)[str(image["id"])]["json"])
    names = shards.class_names(split_dir)
    cat_names = {c["id"]: c["name"] for c in ann["categories"]}
    assert names.index(cat_names[others[0]]) in sample["labels"]

    _script(*args, "--out", f"{s3}/script-shards", env=env, cwd=tmp_path)
    on_store = shards.read_manifest(f"{s3}/script-shards/train2017")
    assert on_store["complete"] and on_store["job"]["actors"] == 2
    assert [e["sha256"] for e in on_store["shards"]] == [e["sha256"] for e in after.values()]
    shards.verify_shards(f"{s3}/script-shards/train2017")

