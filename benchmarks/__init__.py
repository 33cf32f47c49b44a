"""tokops microbenchmark harness: ``python -m benchmarks.run``."""
