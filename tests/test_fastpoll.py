"""
The poll step without the legacy log context (``hookah.fastpoll``), on a
reactor of its own (not the one the suite runs on) driven turn by turn over
real loopback sockets.
"""

from __future__ import annotations

import socket
from typing import Any, Callable, List

from twisted.internet.epollreactor import EPollReactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.selectreactor import SelectReactor
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from hookah import fastpoll


class Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data.upper())


class Grumpy(Protocol):
    """Its connectionLost raises: the one way an exception leaves ``_doReadOrWrite``."""

    lost: List[bool] = []

    def connectionLost(self, reason: Any) -> None:
        Grumpy.lost.append(True)
        raise RuntimeError("grumpy")


def turn_until(reactor: Any, done: Callable[[], bool], turns: int = 200) -> None:
    for _ in range(turns):
        if done():
            return
        reactor.runUntilCurrent()
        reactor.doIteration(0.05)
    raise AssertionError("the reactor did not get there")


class FastPollTests(SynchronousTestCase):
    def reactor(self, kind: type = EPollReactor) -> Any:
        reactor = kind()
        self.addCleanup(reactor._poller.close)
        self.addCleanup(reactor.removeAll)
        return reactor

    def assert_keeps_its_own(self, reactor: Any, reason: str) -> None:
        """``reactor`` is refused with a reason naming ``reason``, and keeps its class's poll step."""
        self.assertIn(reason, fastpoll.check(reactor) or "")
        self.assertFalse(fastpoll.install(reactor))
        self.assertNotIn("doIteration", vars(reactor))

    def connect(self, port: Any) -> socket.socket:
        client = socket.create_connection(("127.0.0.1", port.getHost().port))
        self.addCleanup(client.close)
        return client

    def listen(self, reactor: EPollReactor, protocol: type) -> Any:
        port = reactor.listenTCP(0, Factory.forProtocol(protocol), interface="127.0.0.1")

        def stop() -> None:
            stopped = port.stopListening()
            turn_until(reactor, lambda: stopped.called)

        self.addCleanup(stop)
        return port

    def echo(self, reactor: EPollReactor, port: Any, data: bytes) -> bytes:
        """Send ``data`` to an ``Echo`` port and turn the reactor until the answer is back."""
        client = self.connect(port)
        client.setblocking(False)
        client.sendall(data)
        answer = bytearray()

        def answered() -> bool:
            try:
                answer.extend(client.recv(100))
            except BlockingIOError:
                pass
            return len(answer) >= len(data)

        turn_until(reactor, answered)
        return bytes(answer)

    def test_installed_on_an_epoll_reactor_and_serves_sockets(self) -> None:
        reactor = self.reactor()
        self.assertTrue(fastpoll.install(reactor))
        self.assertIn("doIteration", vars(reactor))
        port = self.listen(reactor, Echo)
        self.assertEqual(self.echo(reactor, port, b"hello"), b"HELLO")

    def test_an_escaping_exception_is_logged_and_the_loop_goes_on(self) -> None:
        reactor = self.reactor()
        self.assertTrue(fastpoll.install(reactor))
        events: List[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        Grumpy.lost = []
        grumpy = self.listen(reactor, Grumpy)
        echo = self.listen(reactor, Echo)
        first = socket.create_connection(("127.0.0.1", grumpy.getHost().port))
        turn_until(reactor, lambda: len(reactor.getReaders()) >= 3)  # two ports and the accepted connection
        first.close()  # the server side reads EOF, and Grumpy.connectionLost raises
        turn_until(reactor, lambda: bool(Grumpy.lost))
        failures = [e for e in events if e.get("log_failure") is not None and "grumpy" in str(e["log_failure"].value)]
        self.assertEqual([e.get("log_format") for e in failures], ["unhandled error in {prefix}"])
        self.assertEqual(failures[0]["prefix"], "Grumpy,0,127.0.0.1")
        self.flushLoggedErrors(RuntimeError)
        # The loop still serves other sockets.
        self.assertEqual(self.echo(reactor, echo, b"still"), b"STILL")

    def test_calls_from_threads_run_between_socket_events(self) -> None:
        """
        A call queued while one socket's event is handled runs before the
        next socket's event of the same poll, not after all of them.
        """
        reactor = self.reactor()
        self.assertTrue(fastpoll.install(reactor))
        happened: List[str] = []

        class Recorder(Protocol):
            def dataReceived(self, data: bytes) -> None:
                happened.append("read")
                if len(happened) == 1:
                    reactor.callFromThread(happened.append, "call")

        port = self.listen(reactor, Recorder)
        clients = [self.connect(port) for _ in range(2)]
        turn_until(reactor, lambda: len(reactor.getReaders()) >= 3)  # the port and both connections
        for client in clients:
            client.sendall(b"x")
        # Loopback has both bytes at the server's sockets already: one poll returns both.
        reactor.doIteration(1.0)
        self.assertEqual(happened, ["read", "call", "read"])

    def test_a_failing_call_from_a_thread_is_logged_and_the_rest_run(self) -> None:
        reactor = self.reactor()
        self.assertTrue(fastpoll.install(reactor))
        happened: List[str] = []

        def fail() -> None:
            raise RuntimeError("bad call")

        class Caller(Protocol):
            def dataReceived(self, data: bytes) -> None:
                reactor.callFromThread(fail)
                reactor.callFromThread(happened.append, "after")

        port = self.listen(reactor, Caller)
        client = self.connect(port)
        client.sendall(b"x")
        turn_until(reactor, lambda: bool(happened))
        self.assertEqual(happened, ["after"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_another_reactor_keeps_its_own_poll_step(self) -> None:
        reactor = SelectReactor()
        self.addCleanup(reactor.removeAll)
        self.assert_keeps_its_own(reactor, "SelectReactor")

    def test_a_reactor_that_is_not_as_expected_keeps_its_own(self) -> None:
        reactor = self.reactor()
        reactor._doReadOrWrite = None
        self.assert_keeps_its_own(reactor, "_doReadOrWrite")
        other = self.reactor()
        other.threadCallQueue = None
        self.assert_keeps_its_own(other, "threadCallQueue")

    def test_a_reactor_with_a_wrapped_callFromThread_keeps_its_own(self) -> None:
        """A method that is not plain Python code (instrumented, say) is reported, not a crash at startup."""

        class Counted:
            def __init__(self, method: Callable[..., Any]) -> None:
                self.method = method
                self.calls = 0

            def __get__(self, reactor: Any, owner: Any) -> Any:
                if reactor is None:
                    return self

                def call(*args: Any, **kwargs: Any) -> Any:
                    self.calls += 1
                    return self.method(reactor, *args, **kwargs)

                return call

        class Instrumented(EPollReactor):
            callFromThread = Counted(EPollReactor.callFromThread)  # type: ignore[assignment]

        self.assert_keeps_its_own(self.reactor(Instrumented), "threadCallQueue")

    def test_uninstall_gives_back_the_class_poll_step(self) -> None:
        reactor = self.reactor()
        fastpoll.install(reactor)
        self.assertIn("doIteration", vars(reactor))
        self.assertIsNotNone(fastpoll.check(reactor), "installed twice would stack")
        fastpoll.uninstall(reactor)
        self.assertNotIn("doIteration", vars(reactor))
        self.assertIsNone(fastpoll.check(reactor))
