"""The artifacts of a finished training (tables, PR curves, gate pictures, the model), logged to its MLflow run."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from rgnn.io.checkpoint import save_checkpoint
from rgnn.train.config import TrainConfig
from rgnn.data import shards
from rgnn.data.transforms import InputConfig, Preprocess, denormalize
from rgnn.train.engine import StageModel
from rgnn.nn.model import RGNN
from rgnn.tables import ap_table, to_csv, to_markdown
from rgnn.tracking.runs import RunLogger
from rgnn.infer.visualize import draw_gates, pr_curves, save_png

GATE_PICTURES = 4


def log_final_artifacts(log: RunLogger, model: RGNN, stage: str, result: dict, class_names: list[str],
                        val_dir: Path, cfg: TrainConfig) -> None:
    """config.json, the per-class AP table (markdown, CSV), PR curves, gate pictures, the model (an MLflow
    Model: rgnn.tracking.pyfunc)."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "config.json").write_text(json.dumps(cfg.to_flat(redacted=True), indent=2))
        table = ap_table({f"RGNN ({stage})": result["ap"]}, class_names)
        (tmp / "per_class_ap.md").write_text(to_markdown(table))
        (tmp / "per_class_ap.csv").write_text(to_csv(table))
        pr_curves(result["scores"], result["targets"], class_names, tmp / "pr_curves.png", result["ap"])
        for name in ("config.json", "per_class_ap.md", "per_class_ap.csv", "pr_curves.png"):
            log.artifact(tmp / name)
        if model.gate is not None and stage in ("gates", "joint"):
            log.artifact(gate_pictures(model, val_dir, cfg.input, tmp / "gates"), "gates")
        folder = save_checkpoint(tmp / "checkpoint", model, class_names, cfg.to_flat(redacted=True), stage=stage)
        log.model(folder, class_names, shards.first_image(val_dir))
    log.class_aps(class_names, result["ap"])


@torch.no_grad()
def gate_pictures(model: RGNN, val_dir: Path, inputs: InputConfig, out: Path) -> Path:
    """Figure 3 for the first few val images, drawn on the network's resized input."""
    preprocess = Preprocess.for_stage(inputs, model.cfg, "joint")
    batch = next(iter(shards.shard_loader(val_dir, preprocess, batch_size=GATE_PICTURES, for_eval=True)))
    device = next(model.parameters()).device
    model.eval()
    o = StageModel(model, "joint")(batch.to(device))
    for i, image_id in enumerate(batch.ids):
        h, w = batch.image_sizes[i].tolist()
        rgb = denormalize(batch.images[i, :, :h, :w], preprocess.mean, preprocess.std)
        sel = (o.image_index == i).cpu()
        save_png(draw_gates(rgb, o.boxes.cpu()[sel].numpy(), o.gates.cpu()[sel].numpy()), out / f"{image_id}.png")
    return out
