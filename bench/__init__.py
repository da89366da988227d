"""Benchmarks: a fake vLLM engine, a load generator and the runner (``python -m bench``)."""
