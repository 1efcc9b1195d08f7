"""``python -m fedlearn.cli``."""

from fedlearn.cli.main import app

app()
