"""Differential privacy: mechanisms, noise sources and the accountant (``[privacy]``)."""
