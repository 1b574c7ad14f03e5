"""Benchmarks: run.py (modes side by side), tree_cost.py + tune.py (choosing a tree)."""
