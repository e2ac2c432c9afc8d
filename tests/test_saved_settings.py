"""Cache records vs wanted settings: fields added since a record was saved count as their defaults, nothing else."""

import dataclasses
import json
from pathlib import Path

from fusion_jax import saved_settings
from fusion_jax.data.configs import SynthFaceConfig
from fusion_jax.synth_metrics import SynthMetricSetup


def _saved(obj) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(obj)))


def test_a_record_without_a_newer_field_matches_that_fields_default_only():
    setup = SynthMetricSetup(faces=SynthFaceConfig(image_size=32))
    record = _saved(setup)
    assert saved_settings.matches(record, setup)
    del record["faces"]["caption_background_dropout"]  # saved before the field existed (nested dataclass)
    del record["margin"]  # and a top-level one
    assert saved_settings.matches(record, setup)
    assert not saved_settings.matches(record, dataclasses.replace(setup, margin=0.3))
    assert not saved_settings.matches(record, dataclasses.replace(
        setup, faces=dataclasses.replace(setup.faces, caption_background_dropout=0.5)))


def test_any_other_difference_is_a_mismatch():
    setup = SynthMetricSetup(faces=SynthFaceConfig(image_size=32))
    record = _saved(setup)
    assert not saved_settings.matches({**record, "unknown_field": 1}, setup)
    assert not saved_settings.matches({**record, "train_photos": 21}, setup)
    assert not saved_settings.matches({**record, "faces": {**record["faces"], "image_size": 64}}, setup)
    assert not saved_settings.matches(None, setup) and not saved_settings.matches("setup", setup)
    # the shipped metric models' record is the quickstart's setup at 32 px
    with open(Path(saved_settings.__file__).parent / "assets" / "miniature" / "metrics" / "synthface_metrics.json") as f:
        shipped = json.load(f)["setup"]
    assert saved_settings.matches(shipped, setup)
