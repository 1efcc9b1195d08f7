"""Runnable experiments and a custom-strategy example."""
