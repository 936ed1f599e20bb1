"""
The outgoing-HTTP seam: everything Hookah sends (deliveries, WebSub
verifications and denials, topic fetches) goes through one ``IHTTPClient``.

The dispatcher and the hub depend on this interface, not on
``hookah.outbound.client.HTTPClient``, so that tests drive them with a client
whose answers they control (``tests/support.FakeClient``), and both are
held to the same method by ``verifyObject``.
"""

from __future__ import annotations

from zope.interface import Interface


class IHTTPClient(Interface):
    def request(method, url, headers=(), body=None, timeout=None):  # type: ignore[misc]
        """
        Send one request and read its answer; never follow a redirect.

        ``method`` and ``url`` are text (the client puts the URL on the
        wire), ``headers`` a sequence of ``(name, value)`` text pairs,
        ``body`` bytes or ``None``. ``timeout`` (seconds) covers the whole
        exchange, response body included.

        Deferred[``hookah.outbound.outcome.Response``] with at most the
        client's cap of the body (``truncated`` says when more was sent);
        fails with ``TimedOut`` past the timeout, with
        ``hookah.outbound.ssrf.TargetRefused`` for an address the SSRF guard
        refuses, and with the connection's own failure otherwise.
        """
