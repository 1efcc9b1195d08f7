"""RELIABILITY.md figures: fuzz, chaos, load, serving, admission."""
