"""Benchmarks of fastaspp against eager PyTorch and torch.compile (used by `fastaspp bench` and benchmarks/).

timing: how one callable is timed; conv, aspp, models: what is compared; report: rows, markdown,
JSON and the environment stamp; plots: the PNG figures.
"""
