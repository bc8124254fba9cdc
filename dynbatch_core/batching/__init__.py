"""Batching policies: pure decisions (schedules of the global batch, per-rank balancers, the goodput rule,
the noise scale, learning-rate rules, step-time models). The standard library and numpy only: no torch,
nothing of dynbatch outside batching/ (tests/test_layers.py checks it).
"""
