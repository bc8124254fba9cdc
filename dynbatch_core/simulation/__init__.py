"""A simulated cluster: N ranks whose step times come from a cost model instead of a model's compute, driven
through the same decision core (batching/decisions.py) the engine and DynamicBatches use, step by step. No torch.

    cluster = Cluster.of(profiles.mix({"A100": 4, "V100": 4}, sample_s=0.0005))   # or calibrate.cluster_from_run()
    result = simulate(RunConfig(world_size=8, balancer="pid", initial_batch=256, train_samples=50_000), cluster)
    result.steps, result.epochs                         # the engine's steps.csv / epochs.csv columns

cluster.py (per-rank costs, noise, spikes, memory, the ring all-reduce), learning.py (progress and loss from a
critical batch), simulator.py (the step loop and the run folder), profiles.py (GPU generations, with sources),
calibration.py (a cluster fitted from a real run's steps.csv).
"""
