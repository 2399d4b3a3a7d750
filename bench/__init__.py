"""The benchmark against `hf download`; a package run from the repo root as `python -m bench.run`."""
