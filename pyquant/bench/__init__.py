"""GPU microbenchmarks, runnable as ``pyquant bench <name>`` or ``python benchmarks/bench_<op>.py``."""
