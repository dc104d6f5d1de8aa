"""End-to-end decode, bf16 vs packed ternary / W2A8 (see pyquant/bench/decode.py); same as `pyquant bench decode`."""
import sys

from pyquant.bench.decode import main

sys.exit(main())
