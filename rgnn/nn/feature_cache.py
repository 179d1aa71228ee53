"""A memo of the frozen front of a trunk: each image's features computed once, not once an epoch.

A pretrained trunk whose first layers no stage trains (`Backbone.frozen`, with BatchNorm frozen and
no dropout) maps the same image to the same features in every epoch and every stage. The photo
recipe freezes every block of EfficientNet-Lite0: on a CPU an RGNN step at T = 64 is 3.2x faster with
their features held (benchmarks/model_step.py), and an epoch of 600 images would recompute them all.

`FeatureCache` keeps each image's output of that front, keyed by the image's bytes (the padded input
tensor as the trunk sees it, so a flipped, jittered or differently padded image is a different key)
and by the front's weights (each tensor's address and in-place version counter: loading other weights
into the same modules misses), least recently used first out once `max_bytes` is held. The result is the front's
output for the batch, the same as computing it (each image's features do not depend on the others'
with frozen BatchNorm); only the images not held are computed, as one batch.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch
from torch import Tensor, nn


def cacheable(modules: list[nn.Module]) -> bool:
    """Whether `modules` map each image alone and the same way in training and evaluation: no BatchNorm
    that uses batch statistics, no dropout of any kind (torch's, or timm's DropPath and DropBlock)."""
    def stochastic(m: nn.Module) -> bool:
        return isinstance(m, nn.modules.batchnorm._BatchNorm) or "Drop" in type(m).__name__

    return not any(stochastic(m) for module in modules for m in module.modules())


class FeatureCache:
    """image bytes -> features of the frozen module `front`, at most `max_bytes` held (least recently used out).

    Attributes:
        hits, misses: images found and computed since the cache was made.
    """

    def __init__(self, front: nn.Module, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"max_bytes={max_bytes}: expected >= 0")
        if not cacheable([front]):
            raise ValueError("a module with BatchNorm (batch statistics) or dropout maps an image differently from call "
                             "to call: its output cannot be held")
        self.front = front
        self.max_bytes = max_bytes
        self.held = 0
        self.hits = self.misses = 0
        self._entries: OrderedDict[tuple, Tensor] = OrderedDict()

    def __call__(self, images: Tensor) -> Tensor:
        """front(images) for Tensor[N, 3, H, W]: Tensor[N, F, h, w], the held images read, the others computed."""
        keys = self._keys(images)
        found = [self._entries.get(k) for k in keys]
        for k, f in zip(keys, found):
            if f is not None:
                self._entries.move_to_end(k)  # used now: the last to go
        todo = [i for i, f in enumerate(found) if f is None]
        self.hits += len(keys) - len(todo)
        self.misses += len(todo)
        if todo:
            with torch.no_grad():
                computed = self.front(images[todo])  # (len(todo), F, h, w)
            for i, features in zip(todo, computed):
                found[i] = features.clone()  # not a view of the batch: the batch is freed
                self._put(keys[i], found[i])
        layout = torch.channels_last if images.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        return torch.stack(found).contiguous(memory_format=layout)  # (N, F, h, w)

    def _keys(self, images: Tensor) -> list[tuple]:
        device = images.device.type
        # the weights as they are: a tensor's version counter moves with every in-place write (load_state_dict),
        # its address when it is replaced (.to())
        weights = tuple((t.data_ptr(), t._version) for t in (*self.front.parameters(), *self.front.buffers()))
        autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        common = (weights, tuple(images.shape[1:]), images.dtype, str(images.device), autocast)
        return [(*common, hashlib.blake2b(image.detach().cpu().numpy().tobytes(), digest_size=16).digest())
                for image in images]

    def _put(self, key: tuple, features: Tensor) -> None:
        size = features.numel() * features.element_size()
        if size > self.max_bytes or key in self._entries:  # too big, or the same image twice in one batch
            return
        self._entries[key] = features
        self.held += size
        while self.held > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self.held -= old.numel() * old.element_size()
