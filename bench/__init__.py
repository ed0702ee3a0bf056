"""The measurement library behind ``par-deploy bench`` and the pytest-benchmark suite."""

from par_deploy.bench.run import BenchError, BenchOptions, bench, run_bench

__all__ = ["BenchError", "BenchOptions", "bench", "run_bench"]
