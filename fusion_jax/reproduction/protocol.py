"""Reproduction protocols (configs/reproduce/*.yaml): what is generated and measured, and the published numbers.

A protocol fixes the experiment of one paper table: how many reference photos per identity, how many people per
image, seeds, sampling settings, and the rows the paper published (with the recognizer each paper used), which
the report prints beside ours. Loaded with the project's typed config reader (unknown keys and wrong types are
errors naming the file and key).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

from fusion_jax import config as config_lib

# Metric columns a published row may give (x100 similarities as the papers print them; FID as is).
METRIC_COLUMNS = ("sim_ref", "sim_target", "paste", "clip_t", "clip_i", "fid")


@dataclasses.dataclass(frozen=True)
class ProtocolConfig:
    """One reproduction protocol."""

    name: str = "custom"  # short name, used in folder names and table rows
    title: str = ""  # what the table reproduces (paper, table number)
    num_references: int = 4  # reference photos per identity fed to the method (FlashFace Table 1: 4)
    num_targets: int = 1  # held-out photos per identity for SimTarget (never used as references)
    people_per_image: int = 1  # 1, or 2 for two-person images (each person its own references and region)
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0, 1])  # one image per prompt x seed x identity
    prompts: list[str] = dataclasses.field(default_factory=lambda: ["a photo of a person"])  # used without --prompts
    steps: int = 50  # denoising steps
    guidance: float = 7.5  # classifier-free text guidance
    reference_guidance: float = 2.0  # reference guidance s_ref (disentangled form)
    guidance_form: str = "disentangled"  # disentangled | cfg
    reference_max_timestep: Optional[int] = None  # reference guidance only while t <= this
    image_size: Optional[int] = None  # generated side in pixels (None: the UNet's sample size)
    bootstrap_samples: int = 2000  # identity resamples for the intervals of the mean columns
    fid_bootstrap_samples: int = 20  # identity resamples for FID's interval (one matrix square root each)
    recognizer_note: str = ""  # the recognizer the paper used (ours is named by --recognizer)
    clip_note: str = ""  # the CLIP model the paper used, and how its CLIP column is scaled
    fid_note: str = ""  # what the paper computed FID against; ours: generated vs all usable photos of --data
    # published rows: method, source, recognizer, note and any of METRIC_COLUMNS
    published: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        where = f"protocol {self.name!r}"
        if self.num_references < 1 or self.num_targets < 1:
            raise ValueError(f"{where}: num_references and num_targets must be >= 1")
        if self.people_per_image not in (1, 2):
            raise ValueError(f"{where}: people_per_image must be 1 or 2, got {self.people_per_image}")
        if not self.seeds:
            raise ValueError(f"{where}: seeds must list at least one seed")
        if self.guidance_form not in ("disentangled", "cfg"):
            raise ValueError(f"{where}: guidance_form must be 'disentangled' or 'cfg', got {self.guidance_form!r}")
        for i, row in enumerate(self.published):
            if not isinstance(row.get("method"), str):
                raise ValueError(f"{where}: published[{i}] needs a string 'method'")
            for key, value in row.items():
                if key in METRIC_COLUMNS:
                    if not isinstance(value, (int, float)) or isinstance(value, bool):
                        raise ValueError(f"{where}: published[{i}].{key} must be a number, got {value!r}")
                elif key not in ("method", "source", "recognizer", "note"):
                    raise ValueError(f"{where}: published[{i}] has unknown key {key!r} (known: method, source, "
                                     f"recognizer, note, {', '.join(METRIC_COLUMNS)})")

    @property
    def photos_needed(self) -> int:
        """Usable photos an identity needs: references plus held-out targets."""
        return self.num_references + self.num_targets


def load_protocol(path: str | Path, overrides: dict | None = None) -> ProtocolConfig:
    """Read a protocol YAML (optionally with key=value overrides already parsed into a dict)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--protocol {path}: no such file (see configs/reproduce/*.yaml)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"--protocol {path}: not valid YAML ({e})") from e
    data.update(overrides or {})
    try:
        return config_lib.from_dict(ProtocolConfig, data, where=f"--protocol {path}")
    except config_lib.ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ValueError(f"--protocol {path}: {e}") from e

