"""The ``fedlearn`` command: ``main`` builds it from the per-area command modules."""
