"""Where config files are: one resolver for `--config tiny`, `--config configs/tiny.yaml` and absolute paths.

The project's configs live in the top-level `configs/` folder of the source tree (users read and edit them there).
The wheel ships the same files as package data `fusion_jax/configs/` (pyproject.toml maps that package to
`configs/`), so an installed `fusion-jax train --config tiny` finds them without a checkout. This module is the only
place that knows the two layouts; everything else asks `resolve_config(...)` or `shipped_config_dir()`.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

SUFFIXES = (".yaml", ".yml")


class ConfigNotFound(FileNotFoundError):
    """A `--config` value that is neither a file nor the name of a shipped config."""


def shipped_config_dir() -> Path:
    """The folder of the shipped configs: the installed package data, else the source checkout's `configs/`."""
    package = Path(str(importlib.resources.files("fusion_jax")))
    for candidate in (package / "configs", package.parent / "configs"):  # wheel install, source checkout
        if (candidate / "tiny.yaml").is_file():
            return candidate
    raise ConfigNotFound(f"no shipped configs next to {package} (looked for {package / 'configs'} and "
                         f"{package.parent / 'configs'}); pass --config with a path to a YAML file")


def shipped_configs() -> list[str]:
    """Names of the shipped configs (`tiny`, `synthfaces/face_fusion`, ...), sorted."""
    try:
        root = shipped_config_dir()
    except ConfigNotFound:
        return []
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*") if p.suffix in SUFFIXES)


def resolve_config(name: str | Path) -> str:
    """`--config` value -> absolute path of an existing YAML file.

    In order: (1) an existing file, absolute or relative to the current folder (a user's own or edited copy wins);
    (2) a shipped config by name, with or without the `configs/` prefix and the `.yaml` suffix: `tiny`,
    `tiny.yaml`, `configs/tiny.yaml`, `synthfaces/face_fusion`. Anything else: ConfigNotFound naming the value,
    where it looked and the shipped names.
    """
    text = str(name)
    given = Path(text).expanduser()
    if given.is_file():
        return str(given.resolve())
    if given.is_dir():
        raise ConfigNotFound(f"config {text!r}: is a folder, expected a YAML file")
    if not given.is_absolute():
        parts = given.parts[1:] if given.parts[:1] == ("configs",) else given.parts
        if parts:
            try:
                root = shipped_config_dir()
            except ConfigNotFound:
                root = None
            if root is not None:
                relative = Path(*parts)
                for candidate in (relative, *(relative.with_name(relative.name + s) for s in SUFFIXES)):
                    if (root / candidate).is_file():
                        return str((root / candidate).resolve())
    known = ", ".join(shipped_configs()) or "none found"
    raise ConfigNotFound(f"config {text!r}: no such file (relative to {Path.cwd()}) and no shipped config of that "
                         f"name (shipped: {known})")
