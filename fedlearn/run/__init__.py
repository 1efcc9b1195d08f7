"""Runs as a user starts them: from a config to a finished, reported, published run.

The run lifecycle (open or resume, checkpoint, finish, report, publish) lives here, above
the engine; ``fedlearn simulate`` and the coordinator daemon both call it.
"""
