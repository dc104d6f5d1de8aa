"""Fused attention-map KL vs eager materialized loss (fwd+bwd time, peak memory); see pyquant/bench/attention_kd.py."""
import sys

from pyquant.bench.attention_kd import main

sys.exit(main())
