"""Packages for setuptools (everything else is in pyproject.toml): jaxft and its subpackages, and
the top-level configs/ (the files users read and copy) installed as the package jaxft.configs, so
`--config=quickstart` works wherever jaxft is installed, from one copy and no build step."""

from setuptools import find_namespace_packages, setup

setup(packages=find_namespace_packages(include=["jaxft", "jaxft.*"]) + ["jaxft.configs"],
      package_dir={"jaxft.configs": "configs"})
