"""Training experiments (not latency or parity benchmarks): the method comparison and the demo
recipe sweep. Run as `python -m benchmarks.experiments.method` / `.recipe_sweep`."""
