"""Configs: TOML files validated with pydantic, for simulations and deployments."""
