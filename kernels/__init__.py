"""Compiled kernels, installed as ``fused_lr.kernels``: Triton (GPU) and Numba (CPU)."""
