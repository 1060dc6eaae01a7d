"""Benchmarks, run by hand: ``python -m bench.<name> --device cpu|gpu``. Results land in
``bench/results/*.json``; ``python -m bench.report`` regenerates ``bench/RESULTS.md`` from them."""
