"""Integrations with training frameworks, each imported only by its user (so `import dynbatch_core` needs none):

    from dynbatch_core.integrations.lightning import DynamicBatchesStrategy    # pip install ".[lightning]"

lightning_steps.py holds the framework-free part (which batches form one optimizer step, the train loader that
hands the plans to the strategy); lightning.py the strategy and its callback.
"""
