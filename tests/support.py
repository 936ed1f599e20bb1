"""
Shared test fixtures: a Hookah service on a real loopback port, a sink
that records what Hookah sends it, an ``HTTPClient`` stand-in whose answers
the test controls, and the small helpers many test modules need (polling
against a deadline, temporary directories, a clean child environment).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections import Counter
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple
from urllib.parse import urlsplit

import attr
from twisted.internet import error as neterror
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.task import Clock, deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web import server
from twisted.web.resource import Resource
from zope.interface import implementer

from hookah.app import HookahService
from hookah.config import Config
from hookah.outbound.outcome import Response
from hookah.outbound.interface import IHTTPClient
from hookah.web.common import HookahSite

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def temp_dir(testcase: TestCase, prefix: str = "hookah-test-") -> str:
    """
    A fresh absolute directory outside the work tree, removed after the test.

    Not ``testcase.mktemp()``: under pytest that path is relative to the
    working directory, the repository itself.
    """
    directory = tempfile.mkdtemp(prefix=prefix)
    testcase.addCleanup(shutil.rmtree, directory, True)
    return directory


def clean_environment() -> Dict[str, str]:
    """This process's environment without HOOKAH_* settings, logs unbuffered."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOOKAH_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


async def poll(what: str, check: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05) -> Any:
    """
    Call ``check`` (plain or async) every ``interval`` seconds of real time
    until it returns something true, and return that; fail once ``timeout``
    seconds have passed. For integration tests that cannot be told.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if isinstance(result, Deferred) or hasattr(result, "__await__"):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await deferLater(reactor, interval, lambda: None)


def http_client(testcase: TestCase) -> Any:
    """A treq client with its own connection pool, closed when the test ends."""
    import treq.client
    from twisted.web.client import Agent, HTTPConnectionPool

    pool = HTTPConnectionPool(reactor, persistent=True)
    testcase.addCleanup(pool.closeCachedConnections)
    return treq.client.HTTPClient(Agent(reactor, pool=pool))


@attr.s(auto_attribs=True)
class Received:
    method: str
    path: str  # with query string
    headers: Dict[str, List[str]]  # lower-cased names
    body: bytes

    def header(self, name: str) -> Optional[str]:
        values = self.headers.get(name.lower())
        return values[-1] if values else None


class Sink(Resource):
    """
    Records every request. ``respond`` decides the answer: a function of the
    ``Received`` returning (code, headers, body), or ``None`` to never answer.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.received: List[Received] = []
        self.respond: Callable[[Received], Optional[Tuple[int, Dict[str, str], bytes]]] = lambda r: (200, {}, b"ok")
        self._waiters: List[Tuple[int, Deferred]] = []
        self.hanging: List[server.Request] = []

    def render(self, request: server.Request) -> Any:
        headers = {
            k.decode().lower(): [v.decode("latin-1") for v in vs]
            for k, vs in request.requestHeaders.getAllRawHeaders()
        }
        received = Received(request.method.decode(), request.uri.decode(), headers, request.content.read())
        self.received.append(received)
        for count, d in list(self._waiters):
            if len(self.received) >= count:
                self._waiters.remove((count, d))
                d.callback(self.received)
        answer = self.respond(received)
        if answer is None:
            self.hanging.append(request)
            return server.NOT_DONE_YET
        code, extra, body = answer
        request.setResponseCode(code)
        for name, value in extra.items():
            request.setHeader(name, value)
        return body

    def wait_for(self, count: int, timeout: float = 10.0) -> Deferred:
        """Deferred[List[Received]] once ``count`` requests have arrived."""
        if len(self.received) >= count:
            return succeed(self.received)
        d: Deferred = Deferred()
        self._waiters.append((count, d))
        d.addTimeout(timeout, reactor)
        return d


def serve(testcase: TestCase, resource: Resource, port: int = 0) -> str:
    """Serve ``resource`` on 127.0.0.1 (any free port unless told) until the test ends; returns the base URL."""
    site = HookahSite(resource)
    site.noisy = False
    listening = reactor.listenTCP(port, site, interface="127.0.0.1")  # type: ignore[arg-type]

    async def stop() -> None:
        stopped = listening.stopListening()
        if stopped is not None:
            await stopped
        await site.close_connections()

    testcase.addCleanup(lambda: ensureDeferred(stop()))
    return f"http://127.0.0.1:{listening.getHost().port}"  # type: ignore[attr-defined]


def listen_sink(testcase: TestCase, sink: Optional[Sink] = None, port: int = 0) -> Tuple[Sink, str]:
    """Serve a ``Sink`` on 127.0.0.1; returns it and its base URL."""
    sink = sink or Sink()
    return sink, serve(testcase, sink, port)


async def start_hookah(testcase: TestCase, **overrides: Any) -> Tuple[HookahService, str]:
    """A running HookahService on a loopback port (memory storage unless told)."""
    settings: Dict[str, Any] = dict(
        listen="tcp:0:interface=127.0.0.1", storage="memory:", allow_private_targets=True
    )
    settings.update(overrides)
    service = HookahService(Config(**settings), reactor)
    service.startService()
    testcase.addCleanup(service.stopService)
    port = await service.listening()
    return service, f"http://127.0.0.1:{port.getHost().port}"


class FakeResolver:
    """A resolver (``hookah.outbound.ssrf.Resolver``) answering every name with fixed addresses; records what was asked."""

    def __init__(self, *addresses: str) -> None:
        self.addresses = list(addresses)
        self.asked: List[Tuple[str, int]] = []

    def __call__(self, host: str, port: int) -> Deferred:
        self.asked.append((host, port))
        return succeed(list(self.addresses))


# -- a client the test drives -------------------------------------------------


def host_of(url: str) -> str:
    return urlsplit(url).hostname or ""


@attr.s(auto_attribs=True)
class Sent:
    method: str
    url: str
    headers: List[Tuple[str, str]]
    body: Optional[bytes]
    timeout: float
    at: float
    deferred: Deferred

    def header(self, name: str) -> Optional[str]:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    @property
    def host(self) -> str:
        return host_of(self.url)

    def respond(self, code: int, headers: Sequence[Tuple[str, str]] = (), body: bytes = b"") -> None:
        self.deferred.callback(Response(code, tuple(headers), body))

    def fail(self, exception: Exception) -> None:
        self.deferred.errback(Failure(exception))


# What to answer with: (code, headers, body), an exception, or None to leave pending.
Answer = Callable[[Sent], Any]


@implementer(IHTTPClient)
class FakeClient:
    """An ``IHTTPClient`` whose every request is answered by ``answer``, and recorded in ``sent``."""

    def __init__(self, clock: Clock, answer: Optional[Answer] = None) -> None:
        self.clock = clock
        self.answer: Answer = answer or (lambda sent: (200, (), b"ok"))
        self.sent: List[Sent] = []
        self.max_outstanding = 0
        self.max_per_host: Counter = Counter()

    def request(self, method: str, url: str, headers: Sequence[Tuple[str, str]] = (), body: Optional[bytes] = None, timeout: float = 30.0) -> Deferred:
        sent = Sent(method, url, list(headers), body, timeout, self.clock.seconds(), Deferred())
        self.sent.append(sent)
        self.max_outstanding = max(self.max_outstanding, len(self.outstanding()))
        self.max_per_host[sent.host] = max(self.max_per_host[sent.host], len(self.outstanding(sent.host)))
        answer = self.answer(sent)
        if isinstance(answer, Exception):
            sent.fail(answer)
        elif answer is not None:
            sent.respond(*answer)
        return sent.deferred

    def outstanding(self, host: Optional[str] = None) -> List[Sent]:
        return [s for s in self.sent if not s.deferred.called and (host is None or s.host == host)]

    def to(self, host: str) -> List[Sent]:
        return [s for s in self.sent if s.host == host]

    def fail_outstanding(self) -> None:
        for sent in self.outstanding():
            sent.fail(neterror.ConnectionLost("test over"))


def submit(dispatcher: Any, deliveries: Sequence[Any]) -> Deferred:
    """
    Store new deliveries and hand them to ``dispatcher`` the way
    ``HookahCore`` does for a dispatch: the dispatcher's intake claims those
    due now, the store writes them, and the claimed ones start once written.
    Deferred[List[Delivery]] as stored.
    """
    intake = dispatcher.intake(list(deliveries))
    return intake.when_stored(dispatcher.store.add_deliveries(intake.deliveries))


def self_signed_tls(hostname: str) -> Tuple[Any, Any]:
    """
    Server TLS options with a throwaway self-signed certificate for
    ``hostname`` (a DNS name or an IP address, also its subject alternative
    name), and that certificate, for a client to trust.
    """
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    from twisted.internet import ssl

    try:
        alternative: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(hostname))
    except ValueError:
        alternative = x509.DNSName(hostname)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([alternative]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = certificate.public_bytes(serialization.Encoding.PEM)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()) + cert_pem
    return ssl.PrivateCertificate.loadPEM(pem).options(), ssl.Certificate.loadPEM(cert_pem)
