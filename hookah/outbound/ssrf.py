"""
The SSRF guard: outgoing requests reach only public addresses, unless the
operator allows private ones or lists networks.

The check is made on the address actually connected to: the endpoint
resolves the host itself, checks every candidate, and connects to a checked
address (the TLS layer still verifies the certificate against the hostname),
so a DNS answer that changes between check and connect (rebinding) cannot
slip through.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any, Callable, List, Optional, Sequence, Union
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.threads import deferToThreadPool
from twisted.web.client import BrowserLikePolicyForHTTPS
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


class TargetRefused(Exception):
    """A destination whose address the guard refuses; retrying will not help."""


class AddressPolicy:
    """Which addresses outgoing requests may reach."""

    def __init__(self, allow_private: bool = False, allowed_networks: Sequence[str] = ()) -> None:
        self.allow_private = allow_private
        self.networks = [ipaddress.ip_network(n, strict=False) for n in allowed_networks]

    def refusal(self, address: str) -> Optional[str]:
        """Why ``address`` is refused, or ``None`` when it may be reached."""
        if self.allow_private:
            return None
        try:
            ip: Address = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return f"{address} is not an IP address"
        if any(ip in network for network in self.networks):
            return None
        # ::ffff:10.0.0.1 reaches 10.0.0.1: judge the IPv4 address inside.
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            if any(ip.ipv4_mapped in network for network in self.networks):
                return None
            ip = ip.ipv4_mapped
        # 2002:7f00:1::/48 (6to4) is tunnelled to the IPv4 address inside.
        if isinstance(ip, ipaddress.IPv6Address) and ip.sixtofour is not None:
            inner = _non_public_kind(ip.sixtofour)
            if inner is not None and not any(ip.sixtofour in network for network in self.networks):
                return f"{ip} is a 6to4 address of {ip.sixtofour}, {'an' if inner[0] in 'aeiou' else 'a'} {inner} address"
        kind = _non_public_kind(ip)
        if kind is None:
            return None
        article = "an" if kind[0] in "aeiou" else "a"
        return f"{ip} is {article} {kind} address"

    def literal_refusal(self, url: str) -> Optional[str]:
        """For a URL whose host is an IP literal: why it is refused, if it is."""
        if self.allow_private:
            return None
        host = urlsplit(url).hostname or ""
        try:
            ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            if host == "localhost" or host.endswith(".localhost"):
                return self.refusal("127.0.0.1")
            return None
        return self.refusal(host)


def _non_public_kind(ip: Address) -> Optional[str]:
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:
        # fec0::/10, deprecated but still routed inside some networks.
        return "site-local"
    if ip.is_multicast:
        return "multicast"
    if ip.is_private:
        return "private"
    if ip.is_reserved:
        return "reserved"
    if not ip.is_global:
        return "non-public"
    return None


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
        return ensureDeferred(self._connect(factory))

    async def _connect(self, factory: Any) -> Any:
        try:
            candidates = [str(ipaddress.ip_address(self._host.split("%", 1)[0]))]
        except ValueError:
            candidates = await self._resolve(self._host, self._port)
        allowed = [a for a in candidates if self._policy.refusal(a) is None]
        if not allowed:
            reasons = "; ".join(r for r in (self._policy.refusal(a) for a in candidates) if r)
            raise TargetRefused(
                f"{self._host} refused by the SSRF guard ({reasons or 'no address'}); "
                "allow it with --allow-private-targets or --allowed-networks"
            )
        address = allowed[0]
        endpoint_class = TCP6ClientEndpoint if ":" in address else TCP4ClientEndpoint
        endpoint: Any = endpoint_class(self._reactor, address, self._port, timeout=self._connect_timeout)
        if self._scheme == b"https":
            creator = self._tls_policy.creatorForNetloc(self._host.encode("idna"), self._port)
            endpoint = wrapClientTLS(creator, endpoint)
        protocol = await endpoint.connect(factory)
        transport = getattr(protocol, "transport", None)
        if transport is not None:
            peer = getattr(transport.getPeer(), "host", None)
            if peer is not None and self._policy.refusal(peer) is not None:
                transport.abortConnection()
                raise TargetRefused(f"{self._host} connected to {peer}, refused by the SSRF guard")
        return protocol


@implementer(IAgentEndpointFactory)
class GuardedEndpointFactory:
    """Endpoints for ``Agent.usingEndpointFactory`` that enforce an ``AddressPolicy``."""

    def __init__(
        self,
        reactor: Any,
        policy: AddressPolicy,
        resolve: Optional[Resolver] = None,
        connect_timeout: float = 10.0,
    ) -> None:
        self._reactor = reactor
        self._policy = policy
        self._resolve = resolve or threaded_resolver(reactor)
        self._tls_policy = BrowserLikePolicyForHTTPS()
        self._connect_timeout = connect_timeout

    def endpointForURI(self, uri: Any) -> GuardedEndpoint:
        host = uri.host.decode("idna") if isinstance(uri.host, bytes) else uri.host
        return GuardedEndpoint(
            self._reactor,
            self._policy,
            self._resolve,
            uri.scheme,
            host.strip("[]"),
            uri.port,
            self._tls_policy,
            self._connect_timeout,
        )
