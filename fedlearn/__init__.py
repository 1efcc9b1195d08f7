"""fedlearn: federated learning with pluggable strategies, fast simulation and per-client evaluation."""
