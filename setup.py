"""Packaging that pyproject.toml cannot say statically: the wheel ships the top-level `configs/` folder.

Every `fusion_jax*` package is found automatically (with the quickstart's shipped model under
fusion_jax/assets/miniature as package data); `configs/` (kept at the top of the repository because users
read and edit it there) becomes the package-data-only package `fusion_jax.configs`, so an installed
`fusion-jax train --config tiny` finds it (`fusion_jax/config_files.py` resolves names in either layout).
All other metadata is in pyproject.toml.
"""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["fusion_jax", "fusion_jax.*"]) + ["fusion_jax.configs"],
    package_dir={"fusion_jax.configs": "configs"},
    package_data={"fusion_jax.configs": ["*.yaml", "**/*.yaml"],
                  # the quickstart's shipped miniature model and metric models (fusion_jax/miniature_assets.py)
                  "fusion_jax": ["assets/miniature/*.json", "assets/miniature/**/*"]},
)
