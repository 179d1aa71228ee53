"""Optimisation beside the paper's recipe: rate schedules, gradient accumulation, clipping, AdamW."""
from __future__ import annotations

import copy

import pytest
import torch

from rgnn.train.config import TrainConfig, resolve
from rgnn.data import shards
from rgnn.data.transforms import Preprocess
from rgnn.train.engine import StageModel, StepOptions, train_one_epoch
from rgnn.nn.model import RGNN
from rgnn.train.schedule import lr_factor, set_trainable
from rgnn.train.stages import Hooks, model_config, run_stages


def test_lr_factor_warms_up_then_follows_its_family():
    assert lr_factor(0.0) == lr_factor(1.0) == 1.0  # the paper's constant rate
    assert lr_factor(0.0, "cosine", 0.2) == pytest.approx(0.1) and lr_factor(0.1, "cosine", 0.2) == pytest.approx(0.55)
    assert lr_factor(0.2, "cosine", 0.2) == pytest.approx(1.0) and lr_factor(1.0, "cosine", 0.2) == pytest.approx(0.0)
    assert lr_factor(0.6, "cosine") == pytest.approx((1 + torch.cos(torch.tensor(0.6 * torch.pi)).item()) / 2)
    assert lr_factor(0.6, "step") == 1.0 and lr_factor(0.7, "step") == pytest.approx(0.1)
    with pytest.raises(ValueError, match="lr_schedule"):
        lr_factor(0.5, "linear-ish")
    with pytest.raises(ValueError, match="warmup"):
        lr_factor(0.5, "cosine", 1.0)


def tiny(shard_root, **kw) -> TrainConfig:
    return resolve(TrainConfig.from_flat({"shards": str(shard_root), "smoke_test": True, "max_regions": 8,
                                          "image_size": 96, "global_size": 64, "dropout": 0.0, **kw}))


def one_update(cfg: TrainConfig, shard_root, model: RGNN, batch_size: int, images: int, scaler=None, **options) -> dict:
    """Train the global stage on the first `images` training images in batches of `batch_size` with
    plain SGD (whose update is proportional to the gradient, so sums and scales show)."""
    params = set_trainable(model, "global")
    optimizer = torch.optim.SGD(params, lr=0.1)
    loader = shards.shard_loader(shard_root / "train2017", Preprocess.for_stage(cfg.input, model.cfg, "global"),
                                 batch_size=batch_size, shuffle=False, num_workers=0)
    batches = [b for _, b in zip(range(images // batch_size), loader)]
    norms = []
    train_one_epoch(StageModel(model, "global"), batches, optimizer, "global", model.cfg.num_classes,
                    torch.device("cpu"), StepOptions(**options), on_step=lambda step, v: norms.append(v.get("grad_norm")),
                    scaler=scaler)
    return {"state": model.state_dict(), "norms": norms}


@pytest.fixture
def update(shard_root):
    """update(batch_size=, images=, **options) -> one_update from the same seed-0 model each time;
    update.start is that model's state."""
    cfg = tiny(shard_root)
    torch.manual_seed(0)
    start = RGNN(model_config(cfg, len(shards.class_names(shard_root / "train2017"))))

    def run(**kw) -> dict:
        return one_update(cfg, shard_root, copy.deepcopy(start), **kw)

    run.start = start.state_dict()
    return run


def moved_by(state: dict, start: dict, keys) -> torch.Tensor:
    """The update, flattened over `keys`."""
    return torch.cat([(state[k] - start[k]).flatten() for k in keys])


def test_accumulating_batches_updates_as_the_large_batch_does(update):
    big = update(batch_size=8, images=8)["state"]
    accumulated = update(batch_size=2, images=8, accumulate=4)["state"]
    separate = update(batch_size=2, images=8)["state"]
    moved = [k for k in big if not torch.equal(big[k], update.start[k])]
    assert moved
    for k in moved:
        torch.testing.assert_close(accumulated[k], big[k], rtol=1e-4, atol=1e-6)
    assert any(not torch.allclose(separate[k], big[k], atol=1e-5) for k in moved)  # 4 updates are not 1
    # an epoch that ends inside a group updates with the mean over the batches it has: 2 of 3
    short = update(batch_size=4, images=8)["state"]  # 2 batches of 4,
    grouped = update(batch_size=4, images=8, accumulate=3)["state"]
    assert any(not torch.allclose(short[k], grouped[k], atol=1e-6) for k in moved)  # 1 update, not 2
    for k in moved:
        torch.testing.assert_close(grouped[k], big[k], rtol=1e-4, atol=1e-6)


def test_clipping_bounds_the_gradient_norm_of_each_update(update):
    free = update(batch_size=4, images=4)["state"]
    clipped = update(batch_size=4, images=4, clip_norm=1e-3)
    assert clipped["norms"][0] > 1e-3  # the norm before clipping is reported
    step = moved_by(clipped["state"], update.start, free) / 0.1
    free_step = moved_by(free, update.start, free) / 0.1
    assert step.norm() == pytest.approx(1e-3, rel=1e-3)  # SGD moved by lr x the clipped gradient
    assert free_step.norm() == pytest.approx(clipped["norms"][0], rel=1e-3)


def test_run_stages_follows_the_rate_schedule_and_takes_adamw(shard_root):
    cfg = tiny(shard_root, epochs=[2, 0, 0, 0], gate="none", batch_size=6, lr=0.01, lr_schedule="cosine",
               warmup=0.25, weight_decay=0.05)
    names = shards.class_names(shard_root / "train2017")
    torch.manual_seed(0)
    model = RGNN(model_config(cfg, len(names)))
    rates = []
    run_stages(cfg, model, names, shard_root / "train2017", shard_root / "val2017", torch.device("cpu"),
               hooks=Hooks(on_step=lambda step, values: rates.append(values["train/lr"])))
    steps = shards.steps_per_epoch(shard_root / "train2017", 6, 1)
    assert len(rates) == 2 * steps
    expected = [0.01 * lr_factor(i / (2 * steps - 1), "cosine", 0.25) for i in range(2 * steps)]
    assert rates == pytest.approx(expected)


def test_optimisation_settings_are_checked():
    for bad in ({"accumulate": 0}, {"clip_norm": 0.0}, {"weight_decay": -1.0}, {"warmup": 1.0},
                {"lr_schedule": "linear"}):
        with pytest.raises(ValueError):
            resolve(TrainConfig.from_flat(bad))


def test_ema_follows_the_weights_with_its_warm_up_and_swaps_back():
    from rgnn.train.ema import EMA

    net = torch.nn.Linear(2, 1)
    with torch.no_grad():
        net.weight.fill_(0.0)
    ema = EMA(net, decay=0.9)
    expected = torch.zeros(1, 2)
    for n, value in enumerate([1.0, 2.0, 3.0], start=1):
        with torch.no_grad():
            net.weight.fill_(value)
        ema.update(net)
        d = min(0.9, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * value
    torch.testing.assert_close(ema.shadow["weight"], expected)
    with ema.applied(net):
        torch.testing.assert_close(net.weight.detach(), expected)
    assert torch.equal(net.weight.detach(), torch.full((1, 2), 3.0))  # the raw weights are back
    again = EMA(net, 0.9, state=ema.state_dict())  # a resumed stage continues the average
    assert again.updates == 3 and torch.equal(again.shadow["weight"], ema.shadow["weight"])
    with pytest.raises(ValueError, match="ema"):
        EMA(net, 1.0)


def test_run_stages_evaluates_the_ema_and_keeps_the_better_on_val(shard_root):
    cfg = tiny(shard_root, epochs=[2, 0, 0, 0], gate="none", batch_size=6, ema=0.9)
    names = shards.class_names(shard_root / "train2017")
    torch.manual_seed(0)
    model = RGNN(model_config(cfg, len(names)))
    reports = []
    stage, result = run_stages(cfg, model, names, shard_root / "train2017", shard_root / "val2017",
                               torch.device("cpu"), hooks=Hooks(report=lambda s, m: reports.append((s.to_dict(), m))))
    state, last = reports[-1]
    assert {"val/raw_mAP", "val/ema_mAP", "val/ema_chosen"} <= set(last)
    best = max(last["val/raw_mAP"], last["val/ema_mAP"])
    assert result["mAP"] == pytest.approx(best) and state["maps"]["global"] == pytest.approx(best)
    assert state["ema"] is not None and state["ema"]["updates"] == 2 * shards.steps_per_epoch(
        shard_root / "train2017", 6, 1)
    again = RGNN(model_config(cfg, len(names)))  # the kept weights are the ones that scored `best`
    again.load_state_dict(model.state_dict())
    from rgnn.train.stages import validate
    assert validate(again, "global", shard_root / "val2017", cfg.input, 6)["mAP"] == pytest.approx(best)


def test_precision_picks_the_autocast_and_fp16_scales_the_loss(update):
    from rgnn.train.engine import autocast_dtype

    assert autocast_dtype("auto", torch.device("cpu")) is None and autocast_dtype("fp32", torch.device("cuda")) is None
    assert autocast_dtype("auto", torch.device("cuda")) == torch.bfloat16  # the GPU default
    assert autocast_dtype("fp16", torch.device("cpu")) == torch.float16
    with pytest.raises(ValueError, match="precision"):
        autocast_dtype("int8", torch.device("cpu"))
    with pytest.raises(ValueError, match="GradScaler"):  # a scaler made per epoch would forget its scale
        update(batch_size=4, images=4, precision="fp16")
    full = update(batch_size=4, images=4)["state"]
    half = update(batch_size=4, images=4, precision="bf16")["state"]
    moved = [k for k in full if not torch.equal(full[k], update.start[k])]
    step, half_step = moved_by(full, update.start, moved), moved_by(half, update.start, moved)
    assert not torch.equal(step, half_step)  # autocast ran the forward in bfloat16 ...
    assert torch.nn.functional.cosine_similarity(step, half_step, 0) > 0.9  # ... and the update is nearly the same
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    fp16_step = moved_by(update(batch_size=4, images=4, precision="fp16", scaler=scaler)["state"], update.start, moved)
    assert torch.nn.functional.cosine_similarity(step, fp16_step, 0) > 0.9 and fp16_step.norm() < 2 * step.norm()
    huge = torch.amp.GradScaler("cpu", init_scale=2.0 ** 40)  # fp16 gradients overflow: the step is skipped
    skipped = update(batch_size=4, images=4, precision="fp16", scaler=huge)["state"]
    assert all(torch.equal(skipped[k], update.start[k]) for k in moved) and huge.get_scale() < 2.0 ** 40



def test_channels_last_is_applied_and_gives_the_same_gradients(shard_root):
    from rgnn.train.engine import memory_format, stage_losses

    assert memory_format("channels_last") == torch.channels_last
    assert memory_format("contiguous") == torch.contiguous_format
    with pytest.raises(ValueError, match="memory_format"):
        memory_format("nhwc")
    names = shards.class_names(shard_root / "train2017")
    cfg = tiny(shard_root, epochs=[1, 0, 0, 0], gate="region", batch_size=6)  # channels_last by default
    torch.manual_seed(0)
    model = RGNN(model_config(cfg, len(names)))
    start = copy.deepcopy(model)
    run_stages(cfg, model, names, shard_root / "train2017", shard_root / "val2017", torch.device("cpu"))
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert not all(w.is_contiguous() for w in convs)
    # the regional forward (RoI pooling on an NHWC map) and backward agree with NCHW's to float rounding
    batch = next(iter(shards.shard_loader(shard_root / "train2017", Preprocess.for_stage(cfg.input, start.cfg, "joint"),
                                          batch_size=4, shuffle=False)))
    grads = []
    for layout in (torch.contiguous_format, torch.channels_last):
        net = copy.deepcopy(start).to(memory_format=layout).eval()
        set_trainable(net, "joint")
        stage_losses(StageModel(net, "joint")(batch), batch, "joint", 0.5, len(names))["loss"].backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)
    assert grads[0].abs().max() > 0


def test_the_oracle_is_evaluated_at_the_iou_threshold_it_was_trained_with(shard_root):
    """--oracle-gates --gate-iou 0.3: the val pass fixes the gates at theta 0.3 too; gate quality is measured at 0.5."""
    from rgnn.train.stages import validate

    cfg = tiny(shard_root, gate="none", oracle_gates=True, gate_iou=0.3)
    torch.manual_seed(0)
    model = RGNN(model_config(cfg, len(shards.class_names(shard_root / "train2017"))))
    got = {theta: validate(model, "regional", shard_root / "val2017", cfg.input, 6, oracle=True, theta=theta)
           for theta in (0.5, 0.3)}
    assert got[0.5]["gate_auc"] == 1.0 and got[0.5]["gate_mean_other"] == 0.0
    # at 0.3 the regions with IoU in (0.3, 0.5] are open too: not objects at 0.5
    assert got[0.3]["gate_mean_object"] == 1.0 and 0.0 < got[0.3]["gate_mean_other"] < 1.0
    assert got[0.3]["mAP"] != got[0.5]["mAP"]
    reports = []
    run_stages(cfg.copy(epochs=[0, 1, 0, 0], start_stage="regional"), model, shards.class_names(shard_root / "train2017"),
               shard_root / "train2017", shard_root / "val2017", torch.device("cpu"),
               hooks=Hooks(report=lambda s, m: reports.append(m)))
    assert reports[-1]["val/gate_mean_other"] > 0.0  # the training's own evaluation: at its theta, 0.3
