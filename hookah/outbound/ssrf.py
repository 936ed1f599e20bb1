"""
The SSRF guard at connect time: outgoing requests reach only addresses the
``AddressPolicy`` (``hookah.urls``) allows.

The check is made on the address actually connected to: the endpoint
resolves the host itself, checks every candidate, and connects to a checked
address (the TLS layer still verifies the certificate against the hostname),
so a DNS answer that changes between check and connect (rebinding) cannot
slip through. The host it is given is read by ``hookah.urls.canonical_host``,
the reading the URL was accepted with, so a numeric, full-width or
trailing-dot spelling of a refused address is refused here too, before any
lookup, whoever built the request.
"""

from __future__ import annotations

import socket
from typing import Any, Callable, List, Optional

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.threads import deferToThreadPool
from twisted.web.client import BrowserLikePolicyForHTTPS
from zope.interface import implementer

from hookah.urls import AddressPolicy, BadURL, TargetRefused, canonical_host

__all__ = ["AddressPolicy", "GuardedEndpoint", "GuardedEndpointFactory", "Resolver", "TargetRefused", "threaded_resolver"]

Resolver = Callable[[str, int], Deferred]


def threaded_resolver(reactor: Any) -> Resolver:
    """Resolve with ``getaddrinfo`` in the reactor's thread pool: every address."""

    def resolve(host: str, port: int) -> Deferred:
        def lookup() -> List[str]:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            return list(dict.fromkeys(str(info[4][0]) for info in infos))

        return deferToThreadPool(reactor, reactor.getThreadPool(), lookup)

    return resolve


@implementer(IStreamClientEndpoint)
class GuardedEndpoint:
    def __init__(
        self,
        reactor: Any,
        policy: AddressPolicy,
        resolve: Resolver,
        scheme: bytes,
        host: str,
        port: int,
        tls_policy: Any,
        connect_timeout: float,
    ) -> None:
        self._reactor = reactor
        self._policy = policy
        self._resolve = resolve
        self._scheme = scheme
        self._host = host
        self._port = port
        self._tls_policy = tls_policy
        self._connect_timeout = connect_timeout

    def connect(self, factory: Any) -> Deferred:
        # The pool builds a factory per connection, which would log its
        # start and stop: two lines per connection, for nothing.
        factory.noisy = False
        return ensureDeferred(self._connect(factory))

    async def _connect(self, factory: Any) -> Any:
        try:
            host, address = canonical_host(self._host, https=self._scheme == b"https")
        except ValueError as e:
            raise BadURL(f"{self._host!r} cannot be connected to: it {e}")
        refusal = self._policy.host_refusal(host, address)
        if refusal is not None:
            raise TargetRefused(f"{host} refused by the SSRF guard ({refusal}); {_HOW_TO_ALLOW}")
        if address is not None:
            candidates = [str(address)]
        else:
            candidates = await self._resolve(host, self._port)
        allowed = [a for a in candidates if self._policy.refusal(a) is None]
        if not allowed:
            reasons = "; ".join(r for r in (self._policy.refusal(a) for a in candidates) if r)
            raise TargetRefused(f"{host} refused by the SSRF guard ({reasons or 'no address'}); {_HOW_TO_ALLOW}")
        address_text = allowed[0]
        endpoint_class = TCP6ClientEndpoint if ":" in address_text else TCP4ClientEndpoint
        endpoint: Any = endpoint_class(self._reactor, address_text, self._port, timeout=self._connect_timeout)
        if self._scheme == b"https":
            # The canonical host is ASCII (A-labels), what the certificate names.
            creator = self._tls_policy.creatorForNetloc(host.encode("ascii"), self._port)
            endpoint = wrapClientTLS(creator, endpoint)
        protocol = await endpoint.connect(factory)
        transport = getattr(protocol, "transport", None)
        if transport is not None:
            peer = getattr(transport.getPeer(), "host", None)
            if peer is not None and self._policy.refusal(peer) is not None:
                transport.abortConnection()
                raise TargetRefused(f"{host} connected to {peer}, refused by the SSRF guard")
        return protocol


_HOW_TO_ALLOW = "allow it with --allow-private-targets or --allowed-networks"


class GuardedEndpointFactory:
    """
    Endpoints, one per (scheme, host, port), that enforce an
    ``AddressPolicy``. ``tls_policy`` (an ``IPolicyForHTTPS``; browser-like by
    default: the system's trust roots, the hostname checked) decides how
    certificates are verified.
    """

    def __init__(
        self,
        reactor: Any,
        policy: AddressPolicy,
        resolve: Optional[Resolver] = None,
        connect_timeout: float = 10.0,
        tls_policy: Any = None,
    ) -> None:
        self._reactor = reactor
        self._policy = policy
        self._resolve = resolve or threaded_resolver(reactor)
        self._tls_policy = tls_policy if tls_policy is not None else BrowserLikePolicyForHTTPS()
        self._connect_timeout = connect_timeout

    def endpoint_for(self, scheme: str, host: str, port: int) -> GuardedEndpoint:
        """
        Never raises: the host is read when connecting, so a host that
        cannot be used fails that connection (``BadURL``) like any other.
        """
        return GuardedEndpoint(
            self._reactor,
            self._policy,
            self._resolve,
            scheme.encode("ascii"),
            host,
            port,
            self._tls_policy,
            self._connect_timeout,
        )
