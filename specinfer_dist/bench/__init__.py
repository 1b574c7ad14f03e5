from specinfer_dist.bench.run import BenchConfig, run_bench

__all__ = ["BenchConfig", "run_bench"]
