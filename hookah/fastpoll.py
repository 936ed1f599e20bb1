"""
The reactor's poll step without Twisted's legacy log context: the third
small adapter (with ``hookah.fastwrite`` and ``hookah.web.fasthead``) that
reads Twisted's private state because it buys real speed, checks itself,
and falls back.

Why it exists: ``EPollReactor.doPoll`` hands every ready socket to
``twisted.python.log.callWithLogger``, which asks the connection for its
``logPrefix()``, copies the legacy log context dict, pushes it on a
thread-local context stack and pops it again, once per socket event. Under
``POST /dispatch`` load that is about 5 % of the server's CPU, spent on a
context only legacy ``twisted.python.log.msg``/``err`` calls read (to fill
the ``system`` field of a classic log line). Hookah logs through
``twisted.logger``, whose events never read it. Here the same loop calls
``_doReadOrWrite`` directly; an exception escaping it is logged as a
failure (with the connection's ``logPrefix`` in the event) and the loop goes
on, as ``callWithLogger`` does.

What changes for a reader of the log: a legacy ``log.msg``/``log.err``
made inside a socket callback (only Twisted's own code makes them) shows
``[-]`` instead of the connection's prefix as its ``system``.

Calls from other threads go first. Twisted runs what ``callFromThread``
queued only in ``runUntilCurrent``, after every socket event of the poll
that woke it: under dispatch load a poll returns dozens of them (new
requests, the receivers' answers), and a SQLite commit's results (the
``202`` answers, the deliveries to start) waited 0.4 to 3.5 ms behind
them, while the clients that wait for those answers sent nothing. Here the
queue is looked at after each socket event and run as ``runUntilCurrent``
runs it (the calls queued when it starts, in order, an exception logged and
the rest run), so finishing accepted work goes before taking new work.

What it relies on, all of ``twisted.internet.epollreactor.EPollReactor``,
none of it public: ``_poller`` (``select.epoll``), ``_selectables`` (a dict
of fd to selectable), ``_doReadOrWrite(selectable, fd, event)``, and that
``doIteration`` is ``doPoll`` and is what ``mainLoop`` calls each turn;
and of ``ReactorBase``: ``threadCallQueue``, the list ``callFromThread``
appends to and ``runUntilCurrent`` runs. A reactor of another class, or
one where any of that is off, keeps its own ``doIteration`` with one log
line.
"""

from __future__ import annotations

import errno
import select
from typing import Any, Callable, Optional, Tuple

from twisted.logger import Logger

__all__ = ["install", "uninstall"]

log = Logger()


def check(reactor: Any) -> Optional[str]:
    """What about ``reactor`` is not as this module expects, or None."""
    try:
        from twisted.internet.epollreactor import EPollReactor
    except ImportError:  # not on Linux
        return "there is no epoll reactor here"
    if not isinstance(reactor, EPollReactor):
        return f"the reactor is a {type(reactor).__name__}, not an EPollReactor"
    if type(reactor).doIteration is not EPollReactor.doPoll or "doIteration" in vars(reactor):
        return "the reactor's doIteration is not EPollReactor.doPoll"
    if not isinstance(getattr(reactor, "_poller", None), select.epoll):
        return "EPollReactor has no epoll _poller"
    if not isinstance(getattr(reactor, "_selectables", None), dict):
        return "EPollReactor has no _selectables dict"
    if not callable(getattr(reactor, "_doReadOrWrite", None)):
        return "EPollReactor has no _doReadOrWrite"
    if "callWithLogger" not in _names(EPollReactor.doPoll):
        return "EPollReactor.doPoll no longer calls callWithLogger"
    if not isinstance(getattr(reactor, "threadCallQueue", None), list):
        return "the reactor has no threadCallQueue list"
    for method in (type(reactor).callFromThread, type(reactor).runUntilCurrent):
        if "threadCallQueue" not in _names(method):
            return f"{getattr(method, '__qualname__', repr(method))} no longer uses threadCallQueue"
    return None


def _names(function: Any) -> Tuple[str, ...]:
    """
    The global and attribute names ``function``'s code uses; none for one
    without Python code (a wrapper, a C function), so that ``check`` reports
    it rather than raising from ``install`` at startup.
    """
    return tuple(getattr(getattr(function, "__code__", None), "co_names", ()))


def _poll_step(reactor: Any) -> Callable[[Optional[float]], None]:
    poller = reactor._poller
    selectables = reactor._selectables
    handle = reactor._doReadOrWrite
    queued = reactor.threadCallQueue

    def run_queued() -> None:
        # As runUntilCurrent: what is queued now, not what these calls queue.
        count = 0
        total = len(queued)
        for f, args, kwargs in queued:
            try:
                f(*args, **kwargs)
            except BaseException:
                log.failure("unhandled error in a call from a thread: {call}", call=f)
            count += 1
            if count == total:
                break
        del queued[:count]

    def doPoll(timeout: Optional[float]) -> None:
        if timeout is None:
            timeout = -1
        try:
            ready = poller.poll(timeout, len(selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
        for fd, event in ready:
            selectable = selectables.get(fd)
            if selectable is None:
                continue
            try:
                handle(selectable, fd, event)
            except KeyboardInterrupt:
                raise
            except BaseException:
                log.failure("unhandled error in {prefix}", prefix=_prefix(selectable))
            if queued:
                run_queued()

    return doPoll


def _prefix(selectable: Any) -> str:
    try:
        return str(selectable.logPrefix())
    except Exception:
        return "(buggy logPrefix method)"


def install(reactor: Any) -> bool:
    """
    Give ``reactor`` the poll step without the legacy log context when it is
    an EPollReactor as expected; True when it now has it.
    """
    problem = check(reactor)
    if problem is not None:
        log.info("the reactor keeps its own poll step: {problem}", problem=problem)
        return False
    reactor.doIteration = _poll_step(reactor)
    return True


def uninstall(reactor: Any) -> None:
    """Give ``reactor`` back its class's poll step."""
    vars(reactor).pop("doIteration", None)
