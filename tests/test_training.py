"""The training engine without Ray: rgnn.train.stages.run_stages in one process, resuming, and the
bad inputs cluster/train_coco.py refuses before it starts a cluster."""
from __future__ import annotations

import math
import shutil

import pytest
import torch

from cluster.data import prepare_shards
from cluster.driver import fit
from rgnn.io.checkpoint import save_checkpoint
from rgnn.train.config import TrainConfig, resolve
from rgnn.data import shards
from rgnn.nn.model import RGNN, ModelConfig
from rgnn.train.stages import CHECKPOINT_SCORE, Hooks, TrainState, model_config, run_stages


def tiny_cfg(shard_root, **kw) -> TrainConfig:
    return resolve(TrainConfig.from_flat({"shards": str(shard_root), "smoke_test": True, "max_regions": 8, "image_size": 96,
                                          "global_size": 64, "batch_size": 6, **kw}))


def test_run_stages_reports_every_epoch_and_evaluates_each_stage(shard_root):
    cfg = tiny_cfg(shard_root, epochs=[1, 1, 1, 2])
    names = shards.class_names(shard_root / "train2017")
    torch.manual_seed(0)
    model = RGNN(model_config(cfg, len(names)))
    reports = []
    stage, result = run_stages(cfg, model, names, shard_root / "train2017", shard_root / "val2017",
                               torch.device("cpu"), hooks=Hooks(report=lambda s, m: reports.append((s.stage, s.epoch, m))))
    assert [(r[0], r[1]) for r in reports] == [("global", 1), ("regional", 1), ("gates", 1), ("joint", 1), ("joint", 2)]
    assert stage == "joint" and set(reports[-1][2]["maps"]) == {"global", "regional", "gates", "joint"}
    lams = [r[2]["train/lambda"] for r in reports]
    assert lams[:3] == [0.0, 0.0, 0.0] and lams[3] > lams[4]  # lambda only in stage 4, decaying
    assert reports[2][2]["train/loss_cls"] == 0.0 and reports[2][2]["train/loss_loc"] > 0  # stage 3: eq. 7 only
    assert result["scores"].shape == (12, len(names))  # every val image once
    # gate quality after each gated stage's evaluation, not before
    assert "val/gate_auc" not in reports[1][2] and 0.0 <= reports[2][2]["val/gate_auc"] <= 1.0
    assert 0.0 <= result["gate_ap"] <= 1.0 and result["gate_mean_object"] > 0 and result["gate_mean_other"] > 0
    # joint epoch 1 is not evaluated: val/mAP carries stage 3's over, its checkpoint has no score of its own
    scores = [r[2][CHECKPOINT_SCORE] for r in reports]
    assert math.isnan(scores[3]) and reports[3][2]["val/mAP"] == reports[2][2]["val/mAP"] == scores[2]
    assert scores[4] == result["mAP"] == reports[4][2]["val/mAP"]


def test_resume_continues_from_the_saved_state(shard_root):
    cfg = tiny_cfg(shard_root, epochs=[0, 2, 0, 0], gate="none")
    names = shards.class_names(shard_root / "train2017")
    model = RGNN(model_config(cfg, len(names)))
    seen = []
    state = TrainState(stage="regional", epoch=1, global_step=7)
    run_stages(cfg, model, names, shard_root / "train2017", shard_root / "val2017", torch.device("cpu"),
               state=state, hooks=Hooks(report=lambda s, m: seen.append((s.stage, s.epoch, s.global_step))))
    steps = shards.steps_per_epoch(shard_root / "train2017", cfg.schedule.batch_size)
    assert seen == [("regional", 2, 7 + steps)]  # only the epoch that was left


def test_a_restart_after_the_last_epoch_evaluates_again_for_the_artifacts(shard_root):
    """A worker that fails after its last report (logging the artifacts) restarts at the end: nothing
    trains, and the last stage's evaluation comes back so the artifacts are logged (or fail) again."""
    cfg = tiny_cfg(shard_root, epochs=[0, 2, 0, 0], gate="none")
    names = shards.class_names(shard_root / "train2017")
    model = RGNN(model_config(cfg, len(names)))
    seen = []
    state = TrainState(stage="regional", epoch=2, global_step=9)
    stage, result = run_stages(cfg, model, names, shard_root / "train2017", shard_root / "val2017",
                               torch.device("cpu"), state=state, hooks=Hooks(report=lambda s, m: seen.append(s.stage)))
    assert seen == [] and state.global_step == 9  # nothing trained
    assert stage == "regional" and 0.0 <= result["mAP"] <= 1.0 and result["scores"].shape[1] == len(names)
    assert run_stages(cfg, model, names, shard_root / "train2017", shard_root / "val2017", torch.device("cpu"),
                      state=TrainState(stage="regional", epoch=1, global_step=7))[0] == "regional"


def test_missing_and_corrupt_shards_are_named(shard_root, tmp_path):
    broken = tmp_path / "shards"
    shutil.copytree(shard_root, broken)
    victim = sorted((broken / "val2017").glob("*.tar"))[0]
    victim.write_bytes(victim.read_bytes()[:100])
    with pytest.raises(ValueError, match=victim.name):
        prepare_shards(tiny_cfg(broken).data, tiny_cfg(broken).input)
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        prepare_shards(tiny_cfg(broken).data, tiny_cfg(broken).input)


def test_checkpoint_with_other_classes_is_refused(shard_root, tmp_path):
    names = shards.class_names(shard_root / "train2017")
    other = list(reversed(names))
    save_checkpoint(tmp_path / "ckpt", RGNN(ModelConfig(num_classes=len(other))), other, stage="joint")
    cfg = tiny_cfg(shard_root, init_checkpoint=str(tmp_path / "ckpt"), start_stage="regional",
                   tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", storage=str(tmp_path / "runs"))
    with pytest.raises(ValueError, match="differ"):
        fit(cfg)
    import ray

    assert not ray.is_initialized()  # refused before any Ray starts (one left behind would confuse later Rays)


def test_a_loss_that_does_not_fall_is_named_loudly():
    from rgnn.train.stages import no_learning_warning, stalled

    assert stalled(1.39, 1.38) and stalled(1.39, 1.45) and not stalled(1.39, 1.30)
    text = no_learning_warning("global", 1.38, 1.37, 1e-4, 400, "fine-tune")
    assert "lr 0.0001" in text and "--weights none takes --recipe scratch" in text and "400 per epoch" in text
    text = no_learning_warning("global", 1.38, 1.37, 1e-4, 400, "scratch")
    assert "too small for random weights" in text and "recipe scratch" in text


def test_run_stages_warns_when_the_rate_cannot_move_the_loss(shard_root):
    cfg = tiny_cfg(shard_root, epochs=[3, 0, 0, 0], lr=1e-9, batch_size=2)  # a rate that changes nothing
    names = shards.class_names(shard_root / "train2017")
    warnings = []
    torch.manual_seed(0)
    run_stages(cfg, RGNN(model_config(cfg, len(names))), names, shard_root / "train2017", shard_root / "val2017",
               torch.device("cpu"), hooks=Hooks(on_warning=warnings.append))
    assert len(warnings) == 1 and "has not fallen in the first epoch of the global stage" in warnings[0]
    warnings.clear()
    cfg = tiny_cfg(shard_root, epochs=[1, 0, 0, 0], lr=1e-2, batch_size=1)  # moves a fresh net in 24 steps
    torch.manual_seed(0)
    run_stages(cfg, RGNN(model_config(cfg, len(names))), names, shard_root / "train2017", shard_root / "val2017",
               torch.device("cpu"), hooks=Hooks(on_warning=warnings.append))
    assert warnings == []
