"""The study: run tables -> numbers (analysis) -> sentences (findings) -> figures (plots), the notebooks'
helpers and the report. Never imported by engine/ or batching/ (tests/test_layers.py).
"""
