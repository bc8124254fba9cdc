"""The engine: the ranks and everything around them (sampler, loader, exact step on stock DDP, training loop,
evaluation, checkpoints, elastic resume, launching). Never imports study/ (tests/test_layers.py).
"""
