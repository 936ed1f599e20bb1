"""
A small blocking HTTP client for the ``hookah`` command: it talks to a
running Hookah with the standard library only (``http.client``), so the
command needs no reactor and starts fast.

It owns what every subcommand needs from the server: one persistent
connection reused across requests (``dispatch --from-file`` sends
thousands), the bearer token, the API's ``{"error", "message"}`` replies
turned into ``ServerError``, every way of not reaching the server turned
into one readable ``Unreachable`` sentence, and following ``/stream`` in
any of its formats with reconnection (``follow``).
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple
from urllib.parse import urlencode, urlsplit

from hookah import __version__, defaults
from hookah.streams.parse import SSEMessage, parser_for

USER_AGENT = f"hookah-cli/{__version__}"


class ClientError(Exception):
    """Something the command reports in one line and exits on."""

    exit_code = 1


class Unreachable(ClientError):
    """The server could not be reached at all (refused, unknown host, timeout)."""

    exit_code = 3


class UsageError(ClientError):
    """The command was given something it cannot use."""

    exit_code = 2


class ServerError(ClientError):
    """The server answered, with an error status."""

    def __init__(self, status: int, error: str, message: str) -> None:
        super().__init__(f"{status} {error}: {message}")
        self.status = status
        self.error = error
        self.message = message


def _reason(error: BaseException) -> str:
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, socket.gaierror):
        return "unknown host"
    if isinstance(error, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(error, ssl.SSLError):
        return f"TLS error ({error.reason or error})"
    if isinstance(error, (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)):
        return "the connection was closed"
    return str(error) or type(error).__name__


def server_error(status: int, body: bytes) -> ServerError:
    """The API's JSON error, or the start of whatever else came back."""
    try:
        obj = json.loads(body)
        if isinstance(obj, dict) and "message" in obj:
            return ServerError(status, str(obj.get("error", "error")), str(obj["message"]))
    except ValueError:
        pass
    text = body.decode("utf-8", "replace").strip().splitlines()
    return ServerError(status, http.client.responses.get(status, "error").lower(), text[0][:200] if text else "no details")


class HookahClient:
    def __init__(self, server: str, token: Optional[str] = None, timeout: float = defaults.CLIENT_TIMEOUT) -> None:
        parts = urlsplit(server)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ClientError(f"--server must be an http(s) URL such as http://localhost:8080, not {server!r}")
        self.server = server.rstrip("/")
        self.scheme = parts.scheme
        self.host = parts.hostname
        try:
            self.port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise ClientError(f"--server has an invalid port: {server!r}")
        self.base_path = parts.path.rstrip("/")
        self.token = token
        self.timeout = timeout
        self._connection: Optional[http.client.HTTPConnection] = None

    # -- plumbing -----------------------------------------------------------------

    def _connect(self, timeout: Optional[float]) -> http.client.HTTPConnection:
        if self.scheme == "https":
            return http.client.HTTPSConnection(self.host, self.port, timeout=timeout)
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def headers(self, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
        headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        headers.update(extra or {})
        return headers

    def path(self, path: str, query: Iterable[Tuple[str, str]] = ()) -> str:
        encoded = urlencode(list(query))
        return self.base_path + path + ("?" + encoded if encoded else "")

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def request(
        self, method: str, path: str, body: Optional[bytes] = None, headers: Optional[Dict[str, str]] = None
    ) -> Tuple[int, bytes]:
        """One request on the persistent connection; retried once if a reused connection went stale."""
        for attempt in (1, 2):
            reused = self._connection is not None
            if self._connection is None:
                self._connection = self._connect(self.timeout)
            try:
                self._connection.request(method, path, body=body, headers=self.headers(headers))
                response = self._connection.getresponse()
                data = response.read()
                if response.getheader("connection", "").lower() == "close":
                    self.close()
                return response.status, data
            except (http.client.HTTPException, OSError) as e:
                self.close()
                if reused and attempt == 1 and not isinstance(e, (socket.timeout, TimeoutError)):
                    continue
                raise Unreachable(f"cannot reach Hookah at {self.server}: {_reason(e)}")
        raise AssertionError("unreachable")  # pragma: no cover

    def call(
        self, method: str, path: str, body: Optional[bytes] = None, headers: Optional[Dict[str, str]] = None
    ) -> Dict[str, Any]:
        """A request whose 2xx answer is JSON; anything else raises ``ServerError``."""
        status, data = self.request(method, path, body, headers)
        if not 200 <= status < 300:
            raise server_error(status, data)
        try:
            obj = json.loads(data) if data.strip() else {}
        except ValueError:
            raise ClientError(f"the server at {self.server} did not answer with JSON; is it Hookah?")
        return obj if isinstance(obj, dict) else {"value": obj}

    # -- streams ----------------------------------------------------------------

    def open_stream(
        self, path: str, headers: Dict[str, str], idle_timeout: float
    ) -> Tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """Open a long-lived response on its own connection; raises ``Unreachable`` or ``ServerError``."""
        connection = self._connect(idle_timeout)
        try:
            connection.request("GET", path, headers=self.headers(headers))
            response = connection.getresponse()
        except (http.client.HTTPException, OSError) as e:
            connection.close()
            raise Unreachable(f"cannot reach Hookah at {self.server}: {_reason(e)}")
        if response.status != 200:
            data = response.read()
            connection.close()
            raise server_error(response.status, data)
        return connection, response


# The query that asks ``/stream`` for each format the parsers read.
STREAM_FORMATS: Dict[str, List[Tuple[str, str]]] = {
    "json": [],
    "length": [("delimited", "length")],
    "sse": [("format", "sse")],
}


def _classify(message: Any) -> Tuple[str, Any]:
    """
    What the server wrote (``StreamFormat.message``): ``("event", obj)`` for
    an event, ``("closing", reason)`` for the error message before it closes
    a stream (a JSON object with ``error`` and no ``id``, or in SSE a
    ``hookah-error`` event), ``("gap", text)`` for the notice that the
    resume point left the history (a JSON object with ``gap`` and no ``id``,
    or in SSE a ``hookah-gap`` event). Raises ``ValueError`` for SSE data
    that is not JSON.
    """
    if isinstance(message, SSEMessage):
        obj = message.json()
        if message.event in ("hookah-error", "hookah-gap"):
            kind = "closing" if message.event == "hookah-error" else "gap"
            return kind, str(obj.get("message", obj.get("error")) if isinstance(obj, dict) else obj)
        return "event", obj
    if isinstance(message, dict) and "id" not in message:
        if "error" in message:
            return "closing", str(message.get("message", message["error"]))
        if message.get("gap") is True:
            return "gap", str(message.get("message", "events may have been missed"))
    return "event", message


def follow(
    client: HookahClient,
    topics: List[str],
    on_event: Callable[[Dict[str, Any]], None],
    on_notice: Callable[[str], None],
    count: int = 0,
    last_event_id: Optional[str] = None,
    limit: Optional[int] = None,
    idle_timeout: float = 120.0,
    first_delay: float = 1.0,
    max_delay: float = 30.0,
    sleep: Callable[[float], None] = time.sleep,
    stream_format: str = "json",
    on_warning: Optional[Callable[[str], None]] = None,
) -> int:
    """
    Follow ``/stream`` for ``topics`` in ``stream_format`` (``json``,
    ``length`` or ``sse``, read by the parsers of ``hookah.streams.parse``)
    and call ``on_event`` with each event's JSON object, until ``limit``
    events (forever when None). After a drop, or bytes that do not follow
    the format, reconnect with ``Last-Event-ID`` set to the last event seen,
    so nothing still in the topic's history is missed, waiting
    ``first_delay`` seconds and doubling up to ``max_delay`` while the
    server stays away. The first connection failing is an error
    (``Unreachable``/``ServerError``): there is nothing to resume yet.
    A gap notice (the resume point left the history: events may have been
    missed) goes to ``on_warning`` (``on_notice`` when None), never to
    ``on_event``. Returns the number of events seen.
    """
    if stream_format not in STREAM_FORMATS:
        raise UsageError(f"the stream format must be one of {', '.join(STREAM_FORMATS)}, not {stream_format!r}")
    seen = 0
    delay = first_delay
    connected_before = False
    while limit is None or seen < limit:
        query: List[Tuple[str, str]] = [("topic", t) for t in topics] + STREAM_FORMATS[stream_format]
        headers: Dict[str, str] = {}
        if last_event_id is not None:
            headers["Last-Event-ID"] = last_event_id
        elif count and not connected_before:
            query.append(("count", str(count)))
        try:
            connection, response = client.open_stream(client.path("/stream", query), headers, idle_timeout)
        except ClientError as e:
            if not connected_before or (isinstance(e, ServerError) and 400 <= e.status < 500):
                raise
            on_notice(f"{e}; retrying in {delay:g}s")
            sleep(delay)
            delay = min(delay * 2, max_delay)
            continue
        if connected_before:
            on_notice("reconnected" + (f", resuming after {last_event_id}" if last_event_id else ""))
        else:
            on_notice(f"following {', '.join(topics)} on {client.server}")
        connected_before = True
        delay = first_delay
        reason = "the server ended the stream"
        parser = parser_for(stream_format)
        try:
            while limit is None or seen < limit:
                # Reading and parsing may fail; on_event's own errors (a
                # closed stdout) are not the stream's and go to the caller.
                try:
                    data = response.read1(65536)
                    messages = [_classify(m) for m in parser.feed(data)] if data else []
                except (http.client.HTTPException, OSError) as e:
                    reason = f"connection lost ({_reason(e)})"
                    break
                except ValueError as e:  # StreamParseError, or JSON that does not parse
                    reason = f"the stream could not be read ({e})"
                    break
                if not data:
                    break
                for kind, event in messages:
                    if kind == "closing":
                        reason = f"the server closed the stream: {event}"
                        continue
                    if kind == "gap":
                        (on_warning or on_notice)(f"warning: {event}")
                        continue
                    if isinstance(event, dict) and event.get("id") is not None:
                        last_event_id = str(event["id"])
                    seen += 1
                    on_event(event)
                    if limit is not None and seen >= limit:
                        break
        finally:
            response.close()
            connection.close()
        if limit is not None and seen >= limit:
            break
        on_notice(f"{reason}; reconnecting in {delay:g}s")
        sleep(delay)
        delay = min(delay * 2, max_delay)
    return seen
