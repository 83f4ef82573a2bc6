"""The ``tuneval`` command line (``tuneval.cli.main``)."""
