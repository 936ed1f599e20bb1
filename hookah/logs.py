"""
Log output for the server: twistd's text log by default, or one JSON object
per line (``--log-format json``) for log shippers.
"""

from __future__ import annotations

import sys

from twisted.logger import globalLogBeginner, jsonFileLogObserver


def configure_logging(log_format: str) -> None:
    if log_format == "json":
        globalLogBeginner.beginLoggingTo([jsonFileLogObserver(sys.stdout)], redirectStandardIO=False)
