"""Per-client evaluation reports for a recorded run.

* :mod:`~fedlearn.report.summary` - :func:`summarize` reads a run store into a ``Report``;
* :mod:`~fedlearn.report.files` - :func:`write_report` writes JSON, CSV and plots;
* :mod:`~fedlearn.report.plots` - the two PNG plots (matplotlib, imported when drawing);
* :mod:`~fedlearn.report.console` - :func:`print_report` prints rich tables.
"""
