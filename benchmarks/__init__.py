"""Speed measurements: training and sampling throughput (``python -m benchmarks.benchmark``)."""
