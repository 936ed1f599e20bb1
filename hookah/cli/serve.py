"""
``hookah serve``: the server in the foreground, for people who do not know
``twistd``. The service is built by exactly the code ``twistd -n hookah``
runs (``hookah.tap.Options`` and ``makeService``), so the options, the
configuration file and the environment variables are the same; only the
process management differs: no pid file, logs on stdout, Ctrl-C or SIGTERM
stops it after the work in flight is recorded.
"""

from __future__ import annotations

import sys
from typing import Any, List, Optional

from twisted.python import usage


def serve(argv: List[str], reactor: Optional[Any] = None) -> int:
    from hookah.logs import start_logging
    from hookah.tap import Options, makeService

    class ServeOptions(Options):
        def getSynopsis(self) -> str:
            return "Usage: hookah serve [options]"

    options = ServeOptions()
    try:
        options.parseOptions(argv)
    except usage.UsageError as e:
        sys.stderr.write(f"hookah serve: {e}\nRun `hookah serve --help` for the options.\n")
        return 2
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor
    service = makeService(options, reactor)
    start_logging(options.config.log_format)
    reactor.callWhenRunning(service.startService)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()
    # A service that could not start (storage would not open) has logged
    # why and stopped the reactor before its web port was ever added.
    web = getattr(service, "web", None)
    return 0 if web is None or web.parent is not None else 1

