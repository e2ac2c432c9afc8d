"""Config machinery: YAML inheritance, typed overrides, and errors that name the key and the file."""

from __future__ import annotations

import dataclasses
import os
from typing import Literal, Optional

import pytest

from fusion_jax.config import (
    ConfigError,
    ExperimentConfig,
    load_config,
    parse_override,
    save_config,
    split_argv,
    to_dict,
)
from tests.train_helpers import TINY_YAML


@dataclasses.dataclass(frozen=True)
class _Inner:
    sizes: tuple[int, ...] = (1, 2)  # variable-length tuple
    pair: tuple[int, str] = (0, "a")  # fixed-length tuple
    names: list[str] = dataclasses.field(default_factory=list)  # a list
    scale: Optional[float] = None  # optional float
    mode: Literal["joint", "decoupled"] = "joint"  # choice


@dataclasses.dataclass(frozen=True)
class _Schema:
    steps: int = 1  # an int
    flag: bool = False  # a bool
    name: str = "x"  # a str
    inner: _Inner = dataclasses.field(default_factory=_Inner)  # a section


def _write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return str(path)


def test_base_inheritance_is_relative_and_child_wins(tmp_path):
    _write(tmp_path / "bases" / "root.yaml", "train:\n  steps: 7\n  lr: 0.5\nmesh:\n  fsdp: 2\n")
    _write(tmp_path / "bases" / "mid.yaml", "base: root.yaml\ntrain:\n  lr: 1.0e-3\n")
    child = _write(tmp_path / "exp" / "child.yaml", "base: ../bases/mid.yaml\ntrain:\n  warmup_steps: 3\n")
    cfg = load_config(child)
    assert (cfg.train.steps, cfg.train.lr, cfg.train.warmup_steps, cfg.mesh.fsdp) == (7, 1e-3, 3, 2)
    # Untouched fields keep the dataclass defaults.
    assert cfg.train.b1 == ExperimentConfig().train.b1


def test_overrides_are_parsed_by_field_type(tmp_path):
    cfg = load_config(
        None,
        [
            "steps=12", "flag=true", "name=01", "inner.sizes=3,4,5", "inner.pair=[9, b]",
            "inner.names=[a, b]", "inner.scale=1e-4", "inner.mode=decoupled",
        ],
        cls=_Schema,
    )
    assert cfg == _Schema(12, True, "01", _Inner((3, 4, 5), (9, "b"), ["a", "b"], 1e-4, "decoupled"))
    assert load_config(None, ["inner.scale=none"], cls=_Schema).inner.scale is None
    # The experiment config: dotted keys into sections, Optional fields, YAML's '1e-4 is a string' quirk.
    exp = load_config(TINY_YAML, ["train.lr=1e-4", "train.ema_decay=None", "mesh.data=2", "workdir=/w"])
    assert (exp.train.lr, exp.train.ema_decay, exp.mesh.data, exp.workdir) == (1e-4, None, 2, "/w")


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.stepz=3", "unknown config key 'train.stepz'"),
        ("trian.steps=3", "unknown config key 'trian.steps'"),
        ("train.steps=3.5", "key 'train.steps': expected int"),
        ("train.cosine=maybe", "key 'train.cosine': expected bool"),
        ("data.source=imagenet", "key 'data.source': expected one of ['synthetic'"),
        ("train=3", "key 'train' is a section"),
        ("train.steps", "expected key=value"),
    ],
)
def test_bad_override_names_key_and_source(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(TINY_YAML, [override])
    assert message in str(e.value)
    assert f"command-line override '{override}'" in str(e.value)


def test_unknown_yaml_key_names_dotted_key_and_file(tmp_path):
    path = _write(tmp_path / "bad.yaml", "train:\n  steps: 3\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(path) in str(e.value) and "unknown config key 'train.learning_rate'" in str(e.value)
    assert "lr" in str(e.value)  # lists the known keys, so the typo is easy to fix


def test_yaml_type_error_in_a_base_names_that_file(tmp_path):
    base = _write(tmp_path / "base.yaml", "train:\n  steps: ten\n")
    child = _write(tmp_path / "child.yaml", "base: base.yaml\nmesh:\n  data: 1\n")
    with pytest.raises(ConfigError) as e:
        load_config(child)
    assert str(base) in str(e.value) and "key 'train.steps': expected int, got str 'ten'" in str(e.value)
    # A section given a scalar, a bool for an int, and YAML syntax errors are named too.
    for text, message in [
        ("train: 3\n", "key 'train': expected a mapping"),
        ("train:\n  steps: true\n", "key 'train.steps': expected int, got bool"),
        ("train: [\n", "not valid YAML"),
        ("base: missing.yaml\n", "config file not found"),
    ]:
        path = _write(tmp_path / "case.yaml", text)
        with pytest.raises(ConfigError, match="case.yaml|missing.yaml") as e:
            load_config(path)
        assert message in str(e.value)


def test_circular_base_is_an_error(tmp_path):
    a = _write(tmp_path / "a.yaml", "base: b.yaml\n")
    _write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(a)


def test_save_config_round_trips(tmp_path):
    cfg = load_config(TINY_YAML, ["train.lr=3e-4", "train.ema_decay=0.99", "workdir=/tmp/x"])
    path = str(tmp_path / "run" / "config.yaml")
    save_config(cfg, path)
    assert load_config(path) == cfg
    nested = load_config(None, ["inner.sizes=[4]", "inner.pair=(1, q)"], cls=_Schema)
    save_config(nested, path)
    assert load_config(path, cls=_Schema) == nested
    assert to_dict(nested)["inner"]["sizes"] == [4]


def test_split_argv():
    assert split_argv(["--config", "a.yaml", "x.y=1", "z=2"]) == ("a.yaml", ["x.y=1", "z=2"])
    assert split_argv(["--config=a.yaml"]) == ("a.yaml", [])
    with pytest.raises(ConfigError, match="unexpected argument '--steps'"):
        split_argv(["--steps", "3"])


def test_cli_reports_config_errors_without_training(capsys):
    from fusion_jax.training.__main__ import main

    assert main(["--config", TINY_YAML, "train.stepz=3"]) == 2
    assert "unknown config key 'train.stepz'" in capsys.readouterr().err


def test_parse_override_builds_nested_dict():
    assert parse_override(ExperimentConfig, "checkpoint.keep_every=5") == {"checkpoint": {"keep_every": 5}}
