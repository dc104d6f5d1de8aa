"""Grouped packed matmul of MoE experts vs bf16 grouped GEMM (see pyquant/bench/moe.py); same as `pyquant bench moe`."""
import sys

from pyquant.bench.moe import main

sys.exit(main())
