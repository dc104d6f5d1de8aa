"""Triton kernels, installed as ``pyquant.kernels``. Each module: private ``@triton.jit`` kernels plus a launcher
that checks constraints, allocates the output and launches, in that order."""
