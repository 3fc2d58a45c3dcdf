"""Triton kernels (``@triton.jit``) and their autotune configs; the autograd wiring lives in ``moefuse.ops``."""
