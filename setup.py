"""Packaging: the pure-Python package, kernels/ as fused_lr.kernels, and (later) csrc/."""

from setuptools import setup

setup(
    packages=["fused_lr", "fused_lr.kernels"],
    package_dir={"fused_lr": "fused_lr", "fused_lr.kernels": "kernels"},
)
