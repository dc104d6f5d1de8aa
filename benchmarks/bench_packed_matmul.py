"""2-bit packed matmul vs cuBLAS and gemlite (see pyquant/bench/matmul.py); same as `pyquant bench matmul`."""
import sys

from pyquant.bench.matmul import main

sys.exit(main())
