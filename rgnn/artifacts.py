"""The artifacts of a finished training (tables, PR curves, gate pictures, the model), logged to its MLflow run."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from rgnn.checkpoint import save_checkpoint
from rgnn.config import TrainConfig
from rgnn.data import shards
from rgnn.model import RGNN
from rgnn.tables import ap_table, to_csv, to_markdown
from rgnn.tracking import RunLogger
from rgnn.visualize import draw_gates, pr_curves, save_png

GATE_PICTURES = 4


def log_final_artifacts(log: RunLogger, model: RGNN, stage: str, result: dict, class_names: list[str],
                        val_dir: Path, cfg: TrainConfig) -> None:
    """config.json, the per-class AP table (markdown, CSV), PR curves, gate pictures, the model."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        table = ap_table({f"RGNN ({stage})": result["ap"]}, class_names)
        (tmp / "per_class_ap.md").write_text(to_markdown(table))
        (tmp / "per_class_ap.csv").write_text(to_csv(table))
        pr_curves(result["scores"], result["targets"], class_names, tmp / "pr_curves.png", result["ap"])
        for name in ("config.json", "per_class_ap.md", "per_class_ap.csv", "pr_curves.png"):
            log.artifact(tmp / name)
        if cfg.gate != "none" and stage in ("gates", "joint"):
            log.artifact(gate_pictures(model, val_dir, cfg, tmp / "gates"), "gates")
        log.artifact(save_checkpoint(tmp / "model", model, class_names, cfg.to_dict(), stage=stage), "model")
    for name, a in zip(class_names, result["ap"]):
        if not np.isnan(a):
            log.metric(f"val/AP/{name}", a, 0)


@torch.no_grad()
def gate_pictures(model: RGNN, val_dir: Path, cfg: TrainConfig, out: Path) -> Path:
    """Figure 3 for the first few val images, drawn on the network's resized input."""
    loader = shards.shard_loader(val_dir, batch_size=GATE_PICTURES, image_size=cfg.image_size,
                                 max_size=cfg.max_size, max_regions=cfg.max_regions, for_eval=True)
    batch = next(iter(loader))
    device = next(model.parameters()).device
    model.eval()
    o = model(batch.images.to(device), batch.image_sizes.to(device), [b.to(device) for b in batch.boxes])
    mean = torch.tensor(shards.MEAN).view(3, 1, 1)
    std = torch.tensor(shards.STD).view(3, 1, 1)
    for i, image_id in enumerate(batch.ids):
        h, w = batch.image_sizes[i].tolist()
        rgb = ((batch.images[i, :, :h, :w] * std + mean).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
        sel = (o.image_index == i).cpu()
        save_png(draw_gates(rgb, o.boxes.cpu()[sel].numpy(), o.gates.cpu()[sel].numpy()), out / f"{image_id}.png")
    return out
