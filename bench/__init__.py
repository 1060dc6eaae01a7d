"""Benchmarks, run by hand: ``python -m bench.<name> --device cpu|gpu``. Results land in
``bench/results/NAME-DEVICE-MODEL[-CARD].json`` (older runs under ``bench/results/history/``);
``python -m bench.report`` regenerates ``bench/RESULTS.md`` from the top level."""
