"""FaceStudio trains through train/train.py: the style encoder comes from the folder `facestudio.style_encoder`
names (attached by the experiment builder), the stream's `masked_target` is encoded inside the step and
`face_embedding` read per example (which parameters each preset trains: test_facestudio.py)."""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from tests.test_train_entry import run_train


def test_facestudio_trains_from_the_stream_fields(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    encoder = tmp_path / "clip"
    CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, projection_dim=8, num_hidden_layers=1, num_attention_heads=2,
        image_size=32, patch_size=16)).save_pretrained(encoder)
    workdir = tmp_path / "run"
    result = run_train(str(workdir), str(tmp_path / "cache"), "objective.name=facestudio", "train.steps=2",
                       "train.trainable=adapter", "facestudio.style_dim=8", "facestudio.num_tokens=2",
                       f"facestudio.style_encoder={encoder}", "train.ema_decay=0.0")
    assert result.returncode == 0, result.stderr[-4000:]
    with open(workdir / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 2 and all(np.isfinite(losses)) and all(0 < x < 100 for x in losses)
