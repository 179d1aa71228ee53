"""Training-time augmentation: boxes move exactly with the image; evaluation never augments."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from rgnn.train.config import parse_args
from rgnn.data import shards
from rgnn.data.transforms import Augment, InputConfig, Preprocess, denormalize, jitter_colour

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def painted(h=64, w=96, box=(10, 5, 30, 25)) -> np.ndarray:
    image = np.full((h, w, 3), 40, np.uint8)
    x1, y1, x2, y2 = box
    image[y1:y2, x1:x2] = 220  # pixels x1..x2-1: the box in continuous coordinates
    return image


def extent(image: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(image[..., 0] > 128)
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def test_flip_moves_proposals_and_ground_truth_exactly_with_the_image():
    box = np.float32([[10, 5, 30, 25]])
    pre = Preprocess(InputConfig(image_size=64, max_size=200, max_regions=4), MEAN, STD, augment=Augment(flip=True))
    seen = set()
    for seed in range(8):
        torch.manual_seed(seed)
        p = pre(painted(), box.copy(), np.ones(1, np.float32), gt_boxes=box.copy())
        assert p.size == (64, 96)  # no resize: the pixels can be compared exactly
        out = extent(denormalize(p.image, MEAN, STD))
        assert p.boxes[0].tolist() == out and p.gt_boxes[0].tolist() == out
        seen.add(tuple(out))
    assert seen == {(10, 5, 30, 25), (66, 5, 86, 25)}  # both, over draws


def test_multi_scale_draws_the_shorter_side_and_scales_the_boxes_with_it():
    box = np.float32([[10, 5, 30, 25]])
    pre = Preprocess(InputConfig(image_size=64, max_size=128, max_regions=4), MEAN, STD,
                     augment=Augment(sizes=(32, 128)))
    sides = set()
    for seed in range(10):
        torch.manual_seed(seed)
        p = pre(painted(), box.copy(), np.ones(1, np.float32), gt_boxes=box.copy())
        h, w = p.size
        sides.add(h)
        assert w * 2 == h * 3  # the longer-side cap scales with the drawn side: the aspect is kept
        torch.testing.assert_close(p.gt_boxes[0], torch.tensor(box[0]) * torch.tensor([w / 96, h / 64] * 2))
        torch.testing.assert_close(p.boxes, p.gt_boxes)
    assert sides == {32, 128}
    whole = Preprocess(InputConfig(image_size=64, global_size=48, max_regions=4), MEAN, STD, whole_image=True,
                       augment=Augment(sizes=(32, 128)))
    assert whole(painted(), box, np.ones(1, np.float32)).size == (48, 48)  # stage 1's square is not multi-scale


def test_colour_jitter_factors():
    image = painted()
    assert np.array_equal(jitter_colour(image, 1.0, 1.0, 1.0), image)
    assert jitter_colour(image, 2.0, 1.0, 1.0).max() == 255 and jitter_colour(image, 2.0, 1.0, 1.0).min() == 80
    flat = jitter_colour(image, 1.0, 0.0, 1.0)  # no contrast: one grey level
    assert flat.max() - flat.min() <= 1


def test_augmentation_flags_and_their_checks():
    cfg, _ = parse_args(["--flip", "--train-sizes", "160,192,224", "--color-jitter", "0.2"])
    assert (cfg.augment.flip, cfg.augment.sizes, cfg.augment.jitter) == (True, (160, 192, 224), 0.2)
    assert cfg.flat()["train_sizes"] == "[160, 192, 224]" and cfg.flat()["flip"] == "true"
    plain, _ = parse_args([])
    assert plain.augment == Augment()  # off unless asked for: the paper names none
    with pytest.raises(ValueError):
        parse_args(["--train-sizes", "0,10"])
    with pytest.raises(SystemExit):  # refused by argparse, naming the flag
        parse_args(["--color-jitter", "1.5"])


def test_training_loader_flips_ground_truth_with_its_images(shard_root):
    inputs = InputConfig(image_size=96, max_size=192, global_size=64, max_regions=8)
    def batches(augment):
        torch.manual_seed(0)
        pre = Preprocess(inputs, MEAN, STD, augment=augment)
        return list(shards.shard_loader(shard_root / "train2017", pre, batch_size=4, shuffle=False))
    plain, flipped = batches(Augment()), batches(Augment(flip=True))
    moved = 0
    for a, b in zip(plain, flipped):
        for gt, gt_b, (h, w), image, image_b in zip(a.gt_boxes, b.gt_boxes, a.image_sizes.tolist(), a.images, b.images):
            if torch.equal(image, image_b):
                assert torch.equal(gt, gt_b)
            else:  # this one was mirrored: its boxes with it
                moved += 1
                torch.testing.assert_close(image_b[:, :h, :w], image[:, :h, :w].flip(-1))
                torch.testing.assert_close(gt_b, torch.stack([w - gt[:, 2], gt[:, 1], w - gt[:, 0], gt[:, 3]], 1))
    assert moved > 0
