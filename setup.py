"""Packaging that pyproject.toml cannot express (everything else is there).

The class tables live in the repository's top-level `datasets/` folder: data with their
sources, not a Python package (an importable `datasets` would shadow Hugging Face's). Wheels
and sdists carry them as `rankseg_core/_tables/`, where `rankseg_core.resources` finds them
when rankseg is installed; clones and editable installs read `datasets/` itself.
"""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["rankseg_cli", "rankseg_cli.*", "rankseg_core", "rankseg_core.*"])
    + ["rankseg_core._tables"],
    package_dir={"rankseg_core._tables": "datasets"},
    # The named presets of `rankseg train --config NAME` (YAML data, not a package); py.typed
    # (PEP 561): type checkers read rankseg_core's annotations (the API, docs/api.md).
    package_data={"rankseg_core._tables": ["*/*"], "rankseg_core.config": ["presets/*.yaml"],
                  "rankseg_core": ["py.typed"]},
)
