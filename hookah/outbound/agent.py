"""
The import path the dispatcher and the WebSub modules still use for the
client's vocabulary; the client itself is ``hookah.outbound.client`` (no
longer Twisted's ``Agent``). New code imports from
``hookah.outbound.outcome``.
"""

from hookah.outbound.outcome import Response, TimedOut, describe_failure

__all__ = ["Response", "TimedOut", "describe_failure"]
