"""Static roofline from sm_90 SASS, no GPU needed (see pyquant/bench/static.py); same as `pyquant bench static`."""
import sys

from pyquant.bench.static import main

sys.exit(main())
