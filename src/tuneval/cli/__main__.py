"""``python -m tuneval.cli``."""

from tuneval.cli.main import entry

entry()
