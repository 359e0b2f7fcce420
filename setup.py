"""Metadata, dependencies and the console script are in pyproject.toml; this adds only what it cannot say:
the device code lives in the top-level kernels/ folder but is installed as fusedres.kernels (a top-level
"kernels" package name is taken on PyPI)."""
from setuptools import setup

setup(packages=["fusedres", "fusedres.bench", "fusedres.kernels"], package_dir={"fusedres.kernels": "kernels"})
