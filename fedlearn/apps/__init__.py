"""Client-side apps: TorchClientApp for torch classifiers and the Flower client adapter.

Nothing here imports the serving layer: a site daemon never needs it.
"""
