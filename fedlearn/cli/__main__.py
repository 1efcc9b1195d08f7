"""``python -m fedlearn.cli``."""

from fedlearn.cli.main import main

main()
