"""Tooling beside the package (not installed with it): the throughput ladder and peers (bench.py),
the one-command GPU run (gpu_run.sh, gpu_run.py) and its importer (import_gpu_results.py)."""
