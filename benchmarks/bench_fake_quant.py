"""Fused fake-quant and QATLinear fwd+bwd vs torch (see pyquant/bench/fake_quant.py); same as `pyquant bench fake-quant`."""
import sys

from pyquant.bench.fake_quant import main

sys.exit(main())
