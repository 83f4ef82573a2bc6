"""Keep user errors to one line: Prefect logs every failed task and flow with its traceback,
but for a ``TunevalError`` the CLI prints the one line that matters."""

from __future__ import annotations

import logging

from tuneval.errors import TunevalError

NAMES = ("TunevalError", "DataError", "ConfigError", "ModelError")


class UserErrorFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, TunevalError):
            return False
        return not any(n in record.getMessage() for n in NAMES)


def install() -> None:
    from prefect.logging.configuration import setup_logging

    setup_logging()
    flt = UserErrorFilter()
    for name in ("prefect", "prefect.flow_runs", "prefect.task_runs", "prefect.flow_engine", "prefect.task_engine"):
        logger = logging.getLogger(name)
        logger.addFilter(flt)
        for handler in logger.handlers:
            handler.addFilter(flt)
