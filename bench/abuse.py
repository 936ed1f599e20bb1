"""
The abuse suite: Hookah attacked as an outsider would, on loopback only,
bounded in count and in time, so that the next change cannot quietly bring
back what issue 13 found.

    python bench/abuse.py                 # every phase, seed 13
    python bench/abuse.py --quick         # fewer requests, shorter waits
    python bench/abuse.py --phases fuzz,heads --seed 7

Phases (each bounded by a count and a deadline):

- ``fuzz``: a seeded generator of requests to every endpoint (methods,
  parameters with hostile values, bodies and content types).
- ``heads``: malformed request heads on raw sockets (``HEADS``: smuggling
  with both ``Content-Length`` and ``Transfer-Encoding``, bad chunk sizes,
  NULs, HTTP/0.9 and /2 prefaces, bare LF, oversized lines and headers...):
  each must be answered or closed within a deadline; ``/healthz`` must stay
  green.
- ``slow``: clients trickling a head a byte at a time (closed by the head
  deadline?) and idle connections past ``--max-connections`` (``503``?).
- ``stalled``: history readers with tiny receive buffers that never read,
  over a large history: RSS growth while they stay and after they leave.
- ``chaos``: deliveries to a receiver that answers ``5xx``, hangs, resets
  mid-response, trickles its body or sends a huge one; every acknowledged
  delivery must end ``delivered`` or ``failed``.
- ``kill``: ``kill -9`` at a random moment under dispatch load (SQLite),
  restart, and check every acknowledged delivery is still there and gets
  delivered.
- ``kill-pg``: the same with PostgreSQL storage, on a throwaway cluster
  started by the test suite's helper (``tests/pgsupport.py``: ``initdb``
  and ``pg_ctl`` into a temporary directory, Unix socket only, from
  Debian's ``postgresql`` package). Without the server binaries the phase
  fails; it does not skip.
- ``soak`` (only when asked, ``--phases soak``): ``--soak-seconds`` (600)
  of moderate load, dispatches, a WebSub subscriber and ``--soak-streams``
  (1,000) open streams, with RSS and descriptors sampled every 10 s; the
  figures are in ``docs/reliability.md``.

It prints requests sent, ``5xx`` seen, tracebacks in the server log,
acknowledged / delivered / lost / duplicated, peak RSS and peak open
descriptors of the server, and exits non-zero when an invariant broke
(a ``5xx`` or traceback outside the chaos phase, a head left hanging, an
acknowledged delivery lost). ``tests/test_malformed_heads.py`` runs
``HEADS`` in the test suite.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import random
import socket
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple
from urllib.parse import quote

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests.pgsupport, for kill-pg
import benchlib

HOST = "127.0.0.1"
MAX_BODY = 256 * 1024
HEAD_TIMEOUT = 2
CAP = 200

# -- malformed heads: (name, bytes); {sink} is a loopback URL, percent-encoded --

HEADS: List[Tuple[str, bytes]] = [
    ("CL and TE (smuggling)", b"POST /dispatch?_url={sink} HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    ("TE and CL (smuggling)", b"POST /dispatch?_url={sink} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n"),
    ("two Content-Lengths", b"POST /dispatch?_url={sink} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc"),
    ("negative Content-Length", b"POST /dispatch?_url={sink} HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n"),
    ("Content-Length with a sign", b"POST /dispatch?_url={sink} HTTP/1.1\r\nHost: x\r\nContent-Length: +3\r\n\r\nabc"),
    ("hex Content-Length", b"POST /dispatch?_url={sink} HTTP/1.1\r\nHost: x\r\nContent-Length: 0x10\r\n\r\n"),
    ("bad chunk size", b"POST /dispatch?_url={sink} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n"),
    ("huge chunk size", b"POST /dispatch?_url={sink} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffffffff\r\nabc\r\n"),
    ("chunk without CRLF", b"POST /dispatch?_url={sink} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcdef\r\n0\r\n\r\n"),
    ("TE gzip, chunked", b"POST /dispatch?_url={sink} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"),
    ("NUL in a header", b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n"),
    ("NUL in the request line", b"GET /heal\x00thz HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("HTTP/0.9", b"GET /healthz\r\n\r\n"),
    ("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
    ("bare LF head", b"GET /healthz HTTP/1.1\nHost: x\n\n"),
    ("CR only", b"GET /healthz HTTP/1.1\rHost: x\r\r"),
    ("request line over 16 KB", b"GET /healthz?" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("headers over 16 KB", b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"b" * 1000) for i in range(20)) + b"\r\n"),
    ("one header over 16 KB", b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Long: " + b"c" * 17000 + b"\r\n\r\n"),
    ("501 headers", b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(501)) + b"\r\n"),
    ("space before colon", b"GET /healthz HTTP/1.1\r\nHost : x\r\n\r\n"),
    ("header without colon", b"GET /healthz HTTP/1.1\r\nHost x\r\n\r\n"),
    ("obsolete line folding", b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n"),
    ("unknown method", b"BREW /healthz HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("absolute-form target", b"GET http://evil.example/healthz HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("HTTP/1.2", b"GET /healthz HTTP/1.2\r\nHost: x\r\n\r\n"),
    ("HTTP/9.9", b"GET /healthz HTTP/9.9\r\nHost: x\r\n\r\n"),
    ("lower-case version", b"GET /healthz http/1.1\r\nHost: x\r\n\r\n"),
    ("no version", b"GET /healthz\r\nHost: x\r\n\r\n"),
    ("empty request line", b"\r\n\r\n"),
    ("only spaces", b"   \r\n\r\n"),
    ("Expect 100 over --max-body", b"POST /dispatch?_url={sink} HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\nExpect: 100-continue\r\n\r\n"),
    ("Content-Length over --max-body", b"POST /dispatch?_url={sink} HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n" + b"x" * 4096),
    ("chunked body over --max-body", b"POST /dispatch?_url={sink} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + (b"4000\r\n" + b"x" * 0x4000 + b"\r\n") * 20),
    ("TLS ClientHello", bytes.fromhex("16030100a5010000a10303") + bytes(range(32)) + b"\x00\x00\x02\x00\x2f\x01\x00"),
    ("binary garbage", bytes(random.Random(13).randrange(256) for _ in range(600)) + b"\r\n\r\n"),
    ("percent junk in the path", b"GET /%zz%00%ff/../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("pipelined good and bad", b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nX\r\n\r\n"),
]


def head_bytes(head: bytes, sink: str) -> bytes:
    return head.replace(b"{sink}", quote(sink, safe="").encode())


# -- counters ----------------------------------------------------------------------


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sent = 0
        self.status: Dict[int, int] = {}
        self.no_answer = 0

    def record(self, status: Optional[int]) -> None:
        with self.lock:
            self.sent += 1
            if status is None:
                self.no_answer += 1
            else:
                self.status[status] = self.status.get(status, 0) + 1

    @property
    def server_errors(self) -> int:
        return sum(n for code, n in self.status.items() if code >= 500)


class Sampler(threading.Thread):
    """Peak RSS and open descriptors of the server process, sampled every 0.1 s."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.pid: Optional[int] = None
        self.peak_rss = 0
        self.peak_fds = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.1):
            pid = self.pid
            if pid is None:
                continue
            try:
                self.peak_rss = max(self.peak_rss, benchlib.rss(pid) or 0)
                self.peak_fds = max(self.peak_fds, len(os.listdir(f"/proc/{pid}/fd")))
            except OSError:
                pass


# -- HTTP on raw sockets ---------------------------------------------------------------


def exchange(port: int, data: bytes, timeout: float = 10.0, stream: bool = False) -> Tuple[Optional[int], bytes, str]:
    """
    Send ``data`` on a fresh connection; read until the server closes (or,
    for a stream, until the head is in). (status or None, bytes, how it ended).
    """
    received = b""
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as s:
            try:
                s.sendall(data)
            except OSError:
                pass
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                try:
                    chunk = s.recv(65536)
                except socket.timeout:
                    return _status(received), received, "no answer in time"
                except ConnectionResetError:
                    return _status(received), received, "reset"
                if not chunk:
                    return _status(received), received, "closed"
                received += chunk
                if stream and b"\r\n\r\n" in received:
                    return _status(received), received, "stream head"
                if _complete(received):
                    return _status(received), received, "answered"
            return _status(received), received, "no answer in time"
    except OSError as e:
        return None, received, f"connect failed: {e}"


def _complete(data: bytes) -> bool:
    """Whether ``data`` holds a whole response with a Content-Length or a chunked body (kept-alive connections)."""
    head, found, body = data.partition(b"\r\n\r\n")
    if not found:
        return False
    lower = head.lower()
    if b"\r\ncontent-length:" in lower:
        length = int(lower.split(b"\r\ncontent-length:", 1)[1].split(b"\r\n", 1)[0])
        return len(body) >= length
    if b"transfer-encoding: chunked" in lower:
        return body.endswith(b"0\r\n\r\n")
    return False


def _body(data: bytes) -> bytes:
    head, _, body = data.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" not in head.lower():
        return body
    out = b""
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        try:
            size = int(size_line.split(b";")[0], 16)
        except ValueError:
            break
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2:]
    return out


def _status(data: bytes) -> Optional[int]:
    if data.startswith(b"HTTP/1.") and len(data) >= 12:
        try:
            return int(data[9:12])
        except ValueError:
            return None
    return None


def request(port: int, method: str, path: str, body: bytes = b"", headers: Optional[Dict[str, str]] = None,
            timeout: float = 10.0) -> Tuple[Optional[int], bytes]:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    data = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + body
    status, received, _ = exchange(port, data, timeout, stream=path.startswith("/stream"))
    return status, _body(received)


# -- the server ------------------------------------------------------------------------------


class Server:
    def __init__(self, directory: str, sampler: Sampler, extra: Optional[List[str]] = None,
                 storage: Optional[str] = None, name: str = "hookah") -> None:
        self.directory = directory
        self.sampler = sampler
        self.storage = storage or f"sqlite:{os.path.join(directory, 'abuse.db')}"
        self.name = name
        self.port = benchlib.free_port()
        self.extra = extra or []
        self.child: Optional[benchlib.Child] = None
        self.logs: List[str] = []
        self.start()

    def start(self) -> None:
        argv = [
            benchlib.TWISTD, "-n", "--pidfile=", "hookah", "--listen", f"tcp:{self.port}:interface={HOST}",
            "--storage", self.storage, "--allow-private-targets",
            "--retry-schedule", "0.5,1,2", "--timeout", "3", "--max-body", str(MAX_BODY),
            "--head-timeout", str(HEAD_TIMEOUT), "--max-connections", str(CAP),
            # A chaotic receiver trips the per-host breaker: rest briefly.
            "--breaker-cooldown", "2", *self.extra,
        ]
        self.child = benchlib.Child(f"{self.name}-{len(self.logs)}", argv, self.directory, port=self.port, ready=60)
        self.logs.append(self.child.log_path)
        self.sampler.pid = self.child.proc.pid

    def kill(self) -> None:
        assert self.child is not None
        self.sampler.pid = None
        self.child.proc.kill()
        self.child.proc.wait(30)
        self.child.log.close()

    def stop(self) -> None:
        self.sampler.pid = None
        if self.child is not None:
            self.child.stop()

    def rss_mb(self) -> float:
        assert self.child is not None
        return self.child.rss() / 2**20

    def tracebacks(self) -> int:
        count = 0
        for path in self.logs:
            with open(path, "rb") as f:
                count += f.read().count(b"Traceback (most recent call last)")
        return count

    def healthy(self) -> bool:
        return request(self.port, "GET", "/healthz")[0] == 200


# -- receivers ------------------------------------------------------------------------------------


class Receiver(http.server.ThreadingHTTPServer):
    """A delivery target: ``chaos`` picks a behaviour per request, seeded."""

    daemon_threads = True

    def __init__(self, chaos: bool, seed: int) -> None:
        super().__init__((HOST, 0), _Handler)
        self.chaos = chaos
        self.random = random.Random(seed)
        self.lock = threading.Lock()
        self.arrivals: Dict[str, int] = {}
        self.answered_ok: Dict[str, int] = {}
        self.closing = threading.Event()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.server_address[1]}/hook"

    def pick(self) -> str:
        if not self.chaos:
            return "ok"
        with self.lock:
            return self.random.choices(
                ["ok", "500", "503", "hang", "reset", "slow", "huge"], [40, 15, 5, 10, 10, 10, 10]
            )[0]

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # resets by Hookah giving up on a slow or huge answer are expected

    def close(self) -> None:
        self.closing.set()
        self.shutdown()
        self.server_close()


class _Handler(http.server.BaseHTTPRequestHandler):
    server: Receiver
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        """A WebSub verification of intent: echo the challenge."""
        from urllib.parse import parse_qs, urlsplit

        challenge = parse_qs(urlsplit(self.path).query).get("hub.challenge", [""])[0].encode()
        self.send_response(200 if challenge else 404)
        self.send_header("Content-Length", str(len(challenge)))
        self.end_headers()
        self.wfile.write(challenge)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            token = str(json.loads(body)["token"])
        except (ValueError, KeyError, TypeError):
            token = "?"
        server = self.server
        with server.lock:
            server.arrivals[token] = server.arrivals.get(token, 0) + 1
        behaviour = server.pick()
        if behaviour == "hang":
            server.closing.wait(10)
            return
        if behaviour == "reset":
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
            self.wfile.flush()
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            self.close_connection = True
            return
        if behaviour in ("500", "503"):
            self.send_response(int(behaviour))
            if behaviour == "503":
                self.send_header("Retry-After", "1")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        size = 20 * 2**20 if behaviour == "huge" else 2
        self.send_response(200)
        self.send_header("Content-Length", str(size))
        self.end_headers()
        try:
            if behaviour == "slow":
                for _ in range(8):  # 4 s for 2 bytes: past the 3 s attempt timeout
                    if server.closing.wait(0.5):
                        return
                self.wfile.write(b"ok")
            elif behaviour == "huge":
                chunk = b"h" * 65536
                for _ in range(size // len(chunk)):
                    self.wfile.write(chunk)
            else:
                self.wfile.write(b"ok")
        except OSError:
            return
        with server.lock:
            server.answered_ok[token] = server.answered_ok.get(token, 0) + 1


# -- phases ----------------------------------------------------------------------------------------

NASTY = [
    "", "0", "-1", "1e309", "nan", "inf", "99999999999999999999", "%", "%zz", "%00", "ü", "☃", "\u202e",
    "A" * 5000, "http://127.0.0.1:1/", "http://[::1]/x", "javascript:alert(1)", "http://user:pw@example.com/",
    "../../etc/passwd", "http://localhost./", "http://0x7f000001/", "http://2130706433/", "file:///etc/passwd",
    "subscribe", "unsubscribe", "publish", "json", "sse", "length", "failed", "delivered", "\r\nX-Injected: 1",
]
PARAMS = [
    "_url", "_topic", "_delay", "_retries", "_timeout", "_method", "_header_X-A", "_callback", "_errback",
    "_idempotency_key", "hub.mode", "hub.topic", "hub.url", "hub.callback", "hub.lease_seconds", "hub.secret",
    "hub.verify", "topic", "count", "format", "delimited", "last_event_id", "limit", "after", "status",
    "access_token", "ttl", "topics",
]
PATHS = [
    "/dispatch", "/dispatch/{id}", "/dispatch/{id}/retry", "/dispatch/nope", "/hub", "/hub/subscriptions",
    "/subscribe", "/publish", "/stream", "/stream/tokens", "/topics", "/topics/t/events", "/topics/%2F/events",
    "/healthz", "/metrics", "/", "/login", "/logout", "/favicon.ico", "/%2e%2e/etc", "/dispatch//x",
]
TYPES = [
    None, "application/json", "application/x-www-form-urlencoded", "multipart/form-data; boundary=b",
    "multipart/form-data", "text/plain", "application/octet-stream", "x/\x7f", "application/json; charset=utf-32",
]


def fuzz(server: Server, sink: str, count: int, deadline: float, seed: int, tally: Tally) -> None:
    rng = random.Random(seed)
    ids = ["01ZZZZZZZZZZZZZZZZZZZZZZZZ"]
    for _ in range(count):
        if time.monotonic() > deadline:
            break
        path = rng.choice(PATHS).replace("{id}", rng.choice(ids))
        method = rng.choice(["GET", "POST"]) if rng.random() < 0.75 else rng.choice(
            ["PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "BREW"]
        )
        params = []
        for _ in range(rng.randrange(5)):
            name = rng.choice(PARAMS)
            value = sink if name in ("_url", "hub.callback") and rng.random() < 0.5 else rng.choice(NASTY)
            params.append(f"{quote(name)}={quote(value, safe='')}")
        if path == "/stream" and rng.random() < 0.7:
            params.append("topic=fuzz")
        query = ("?" + "&".join(params)) if params else ""
        content_type = rng.choice(TYPES)
        body = rng.choice([b"", b"{}", b'{"a": 1}', b"[", b"\xff\xfe", b"a=1&b=%zz", b"--b\r\nbroken",
                           os.urandom(rng.randrange(1, 2048)), ("&".join(params)).encode()])
        headers = {"Content-Type": content_type} if content_type else {}
        if rng.random() < 0.1:
            headers["Authorization"] = rng.choice(["Bearer x", "Bearer", "Basic Zm9vOmJhcg==", "Bearer " + "t" * 3000])
        if rng.random() < 0.1:
            headers["Last-Event-ID"] = rng.choice(NASTY[:12])
        status, answer = request(server.port, method, path + query, body if method not in ("GET", "HEAD") else b"",
                                 headers, timeout=10)
        tally.record(status)
        if status == 202 and answer.startswith(b"{"):
            try:
                ids.append(json.loads(answer)["id"])
            except (ValueError, KeyError):
                pass


def heads(server: Server, sink: str, tally: Tally) -> List[str]:
    problems = []
    for name, head in HEADS:
        status, received, how = exchange(server.port, head_bytes(head, sink), timeout=HEAD_TIMEOUT + 8)
        tally.record(status)
        if status is None and how == "no answer in time":
            problems.append(f"{name}: no answer and no close within {HEAD_TIMEOUT + 8}s")
        elif status is not None and status >= 500:
            problems.append(f"{name}: {status}")
        print(f"  {name:32} {status or '-':>4}  {how}")
    if not server.healthy():
        problems.append("/healthz not 200 after the malformed heads")
    return problems


def slow(server: Server, trickling: int, tally: Tally) -> List[str]:
    problems = []
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 1000
    sockets = [socket.create_connection((HOST, server.port)) for _ in range(trickling)]
    started = time.monotonic()
    closed_at: Dict[int, float] = {}
    for i in range(len(head)):
        for n, s in enumerate(sockets):
            if n in closed_at:
                continue
            try:
                s.sendall(head[i:i + 1])
                s.setblocking(False)
                if s.recv(65536, socket.MSG_PEEK) is not None:
                    closed_at[n] = time.monotonic() - started
            except BlockingIOError:
                pass
            except OSError:
                closed_at[n] = time.monotonic() - started
            finally:
                s.setblocking(True)
        if len(closed_at) == len(sockets) or time.monotonic() - started > HEAD_TIMEOUT + 10:
            break
        time.sleep(0.2)
    for s in sockets:
        s.close()
    worst = max(closed_at.values()) if closed_at else None
    print(f"  {trickling} clients trickling a head at 5 bytes/s: {len(closed_at)} answered or closed, "
          f"the last after {worst:.1f}s (head deadline {HEAD_TIMEOUT}s)" if worst is not None else
          f"  {trickling} trickling clients: none closed")
    if len(closed_at) < trickling or (worst or 0) > HEAD_TIMEOUT + 5:
        problems.append("trickling clients outlived the head deadline")
    # Idle connections past the cap.
    idle = []
    for _ in range(CAP + 50):
        try:
            idle.append(socket.create_connection((HOST, server.port)))
        except OSError:
            break
    refused = closed = 0
    for s in idle[CAP:]:
        s.settimeout(5)
        try:
            answer = s.recv(64)
            refused += answer.startswith(b"HTTP/1.1 503")
            closed += answer == b""
        except ConnectionResetError:
            closed += 1
        except OSError:
            pass
    for s in idle:
        s.close()
    tally.record(None)
    extra = len(idle) - CAP
    print(f"  {len(idle)} idle connections against --max-connections {CAP}: of the {extra} past it, "
          f"{refused} answered 503, {closed} closed at once")
    if refused == 0 or refused + closed < extra:
        problems.append("connections past the cap were neither refused with 503 nor closed")
    time.sleep(HEAD_TIMEOUT + 1)  # let the server close the idle ones
    if not server.healthy():
        problems.append("/healthz not 200 after the slow clients")
    return problems


def stalled(server: Server, events: int, readers: int, tally: Tally) -> Dict[str, float]:
    body = b"s" * (MAX_BODY - 1024)
    for _ in range(events):
        tally.record(request(server.port, "POST", "/dispatch?_topic=abuse-history", body,
                             {"Content-Type": "application/octet-stream"})[0])
    request(server.port, "GET", "/topics/abuse-history/events?limit=1000")
    before = server.rss_mb()
    sockets = []
    for i in range(readers):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect((HOST, server.port))
        path = f"/stream?topic=abuse-history&count={events}" if i % 2 == 0 else "/topics/abuse-history/events?limit=1000"
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        sockets.append(s)
    for _ in range(3):
        request(server.port, "GET", "/topics")
    during = server.rss_mb()
    for s in sockets:
        s.close()
    for _ in range(3):
        request(server.port, "GET", "/topics")
    after = server.rss_mb()
    print(f"  {readers} stalled readers of {events} x {len(body) // 1024} KB: RSS {before:.0f} -> {during:.0f} MB "
          f"while they stay, {after:.0f} MB after")
    return {"before": before, "during": during, "after": after}


def dispatch_many(port: int, url: str, tokens: List[int], acknowledged: Dict[int, str], tally: Tally,
                  stop: Optional[threading.Event] = None) -> None:
    for token in tokens:
        if stop is not None and stop.is_set():
            return
        status, answer = request(port, "POST", f"/dispatch?_url={quote(url, safe='')}",
                                 json.dumps({"token": token}).encode(), {"Content-Type": "application/json"}, timeout=10)
        tally.record(status)
        if status == 202:
            acknowledged[token] = json.loads(answer)["id"]


def final_states(port: int, acknowledged: Dict[int, str], deadline: float) -> Dict[str, int]:
    """Poll every acknowledged delivery until it is delivered or failed (or the deadline passes)."""
    states: Dict[int, str] = {}
    while True:
        for token, delivery in acknowledged.items():
            if states.get(token) in ("delivered", "failed"):
                continue
            status, answer = request(port, "GET", f"/dispatch/{delivery}")
            states[token] = json.loads(answer).get("status", "?") if status == 200 else f"http {status}"
        if all(s in ("delivered", "failed") for s in states.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    counts: Dict[str, int] = {}
    for state in states.values():
        counts[state] = counts.get(state, 0) + 1
    return counts


def chaos(server: Server, deliveries: int, seed: int, deadline: float, tally: Tally) -> Dict[str, int]:
    receiver = Receiver(chaos=True, seed=seed)
    try:
        acknowledged: Dict[int, str] = {}
        dispatch_many(server.port, receiver.url, list(range(deliveries)), acknowledged, tally)
        states = final_states(server.port, acknowledged, deadline)
        duplicated = sum(1 for n in receiver.answered_ok.values() if n > 1)
        missing = sum(n for s, n in states.items() if s.startswith("http"))
        unfinished = sum(n for s, n in states.items() if s not in ("delivered", "failed") and not s.startswith("http"))
        print(f"  {len(acknowledged)} acknowledged, states {states}, {duplicated} answered 2xx more than once")
        return {"acknowledged": len(acknowledged), "delivered": states.get("delivered", 0),
                "failed": states.get("failed", 0), "unfinished at the deadline": unfinished, "lost": missing,
                "duplicated": duplicated}
    finally:
        receiver.close()


def kill(server: Server, rounds: int, seed: int, deadline: float, tally: Tally, storage: str = "SQLite") -> Dict[str, int]:
    rng = random.Random(seed)
    receiver = Receiver(chaos=False, seed=seed)
    acknowledged: Dict[int, str] = {}
    try:
        next_token = 0
        for _ in range(rounds):
            stop = threading.Event()
            threads = []
            for _ in range(4):
                tokens = list(range(next_token, next_token + 100000))
                next_token += 100000
                thread = threading.Thread(target=dispatch_many, args=(server.port, receiver.url, tokens, acknowledged, tally, stop))
                thread.start()
                threads.append(thread)
            time.sleep(rng.uniform(1.0, 3.0))
            server.kill()
            stop.set()
            for thread in threads:
                thread.join(30)
            server.start()
        states = final_states(server.port, acknowledged, deadline)
        missing = sum(n for s, n in states.items() if s.startswith("http"))
        never_arrived = sum(1 for t in acknowledged if receiver.arrivals.get(str(t), 0) == 0)
        duplicated = sum(1 for n in receiver.arrivals.values() if n > 1)
        print(f"  {rounds} kill -9 under load ({storage}): {len(acknowledged)} acknowledged, states {states}, "
              f"{missing} missing after restart, {never_arrived} never arrived, {duplicated} arrived twice or more")
        return {"acknowledged": len(acknowledged), "delivered": states.get("delivered", 0),
                "lost": max(missing, never_arrived), "duplicated": duplicated}
    finally:
        receiver.close()


def soak(server: Server, seconds: float, streams: int, tally: Tally) -> Dict[str, Any]:
    """
    Moderate load for ``seconds``: 40 dispatches/s to a receiver, 10 events/s
    on a topic with a WebSub subscriber and ``streams`` open streams; RSS
    and descriptors sampled every 10 s.
    """
    import selectors

    receiver = Receiver(chaos=False, seed=0)
    topic = f"http://{HOST}:{receiver.server_address[1]}/soak-feed"
    callback = f"http://{HOST}:{receiver.server_address[1]}/callback"
    status, body = request(server.port, "POST", "/hub", urlencode_pairs(
        [("hub.mode", "subscribe"), ("hub.topic", topic), ("hub.callback", callback)]),
        {"Content-Type": "application/x-www-form-urlencoded"})
    tally.record(status)
    readers: List[socket.socket] = []
    selector = selectors.DefaultSelector()
    received = [0]
    stop = threading.Event()
    try:
        for batch in range(0, streams, 100):
            for _ in range(min(100, streams - batch)):
                s = socket.create_connection((HOST, server.port))
                s.sendall(f"GET /stream?topic={quote(topic, safe='')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                s.setblocking(False)
                selector.register(s, selectors.EVENT_READ)
                readers.append(s)
            time.sleep(0.5)  # let the server admit the batch (requests are capped, streams apart)

        def read() -> None:
            while not stop.is_set():
                for key, _ in selector.select(0.2):
                    try:
                        data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                    except BlockingIOError:
                        continue
                    except OSError:
                        data = b""
                    if not data:
                        selector.unregister(key.fileobj)
                    received[0] += len(data)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        samples: List[Tuple[float, float, int]] = []
        started = time.monotonic()
        next_sample = started
        sequence = 0
        while time.monotonic() - started < seconds:
            tick = time.monotonic()
            for _ in range(4):
                sequence += 1
                status, _ = request(server.port, "POST", f"/dispatch?_url={quote(receiver.url, safe='')}",
                                    json.dumps({"token": f"soak-{sequence}"}).encode(), {"Content-Type": "application/json"})
                tally.record(status)
            sequence += 1
            status, _ = request(server.port, "POST", f"/dispatch?_topic={quote(topic, safe='')}",
                                json.dumps({"token": f"event-{sequence}"}).encode(), {"Content-Type": "application/json"})
            tally.record(status)
            if tick >= next_sample:
                pid = server.child.proc.pid if server.child else 0
                samples.append((tick - started, server.rss_mb(), len(os.listdir(f"/proc/{pid}/fd"))))
                next_sample += 10
            time.sleep(max(0.0, 0.1 - (time.monotonic() - tick)))
        open_streams = len(selector.get_map())
    finally:
        stop.set()
        for s in readers:
            s.close()
        receiver.close()
    first = [x for x in samples if x[0] < 60] or samples[:1]
    last = [x for x in samples if x[0] >= seconds - 60] or samples[-1:]
    result = {
        "seconds": seconds, "streams still open": open_streams, "stream bytes read": received[0],
        "rss first minute MB": round(sum(x[1] for x in first) / len(first), 1),
        "rss last minute MB": round(sum(x[1] for x in last) / len(last), 1),
        "fds first minute": round(sum(x[2] for x in first) / len(first)),
        "fds last minute": round(sum(x[2] for x in last) / len(last)),
        "deliveries received": sum(receiver.arrivals.values()),
    }
    print("  " + ", ".join(f"{k} {v}" for k, v in result.items()))
    print("  samples (s, RSS MB, fds): " + " ".join(f"{t:.0f}:{r:.0f}/{f}" for t, r, f in samples))
    return result


def kill_postgres(directory: str, sampler: Sampler, rounds: int, seed: int, deadline: float, tally: Tally,
                  servers: List[Server]) -> Dict[str, int]:
    """
    The kill phase on PostgreSQL: a throwaway cluster (the test suite's
    ``tests/pgsupport.py``, removed when this process exits), a fresh
    database, a Hookah of its own on it killed and restarted as in ``kill``.
    """
    from tests import pgsupport

    cluster = pgsupport.cluster()
    database = cluster.create_database()
    previous = sampler.pid
    server = Server(directory, sampler, storage=cluster.url(database), name="hookah-pg")
    servers.append(server)
    try:
        return kill(server, rounds, seed, deadline, tally, storage="PostgreSQL")
    finally:
        server.stop()
        sampler.pid = previous
        cluster.drop_database(database)


def urlencode_pairs(pairs: List[Tuple[str, str]]) -> bytes:
    return "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in pairs).encode()


# -- main ---------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--phases", default="fuzz,heads,slow,stalled,chaos,kill,kill-pg",
                        help="comma-separated; soak (not in the default) runs --soak-seconds of moderate load")
    parser.add_argument("--soak-seconds", type=float, default=600)
    parser.add_argument("--soak-streams", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=3000, help="fuzzed requests at most")
    parser.add_argument("--quick", action="store_true", help="smaller counts and deadlines")
    parser.add_argument("--keep", action="store_true", help="keep the logs and database")
    args = parser.parse_args()
    quick = args.quick
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    benchlib.raise_open_files_limit()
    directory = tempfile.mkdtemp(prefix="hookah-abuse-")
    sampler = Sampler()
    sampler.start()
    tally = Tally()
    problems: List[str] = []
    outcomes: Dict[str, Dict[str, int]] = {}
    soak_result: Dict[str, Any] = {}
    started = time.monotonic()
    server = Server(directory, sampler)
    others: List[Server] = []  # the kill-pg phase's server
    sink = Receiver(chaos=False, seed=args.seed)
    errors_before_chaos = 0
    try:
        steps: List[Tuple[str, Callable[[], Any]]] = [
            ("fuzz", lambda: fuzz(server, sink.url, 500 if quick else args.requests, time.monotonic() + (60 if quick else 300), args.seed, tally)),
            ("heads", lambda: problems.extend(heads(server, sink.url, tally))),
            ("slow", lambda: problems.extend(slow(server, 20 if quick else 100, tally))),
            ("stalled", lambda: stalled(server, 32 if quick else 128, 4 if quick else 10, tally)),
            ("chaos", lambda: outcomes.__setitem__("chaos", chaos(server, 50 if quick else 300, args.seed, time.monotonic() + (60 if quick else 180), tally))),
            ("kill", lambda: outcomes.__setitem__("kill", kill(server, 1 if quick else 3, args.seed, time.monotonic() + (60 if quick else 180), tally))),
            ("kill-pg", lambda: outcomes.__setitem__("kill-pg", kill_postgres(
                directory, sampler, 1 if quick else 3, args.seed, time.monotonic() + (60 if quick else 180), tally, others))),
            ("soak", lambda: soak_result.update(soak(server, 30 if quick else args.soak_seconds, 100 if quick else args.soak_streams, tally))),
        ]
        for name, step in steps:
            if name not in phases:
                continue
            if name == "chaos":
                errors_before_chaos = tally.server_errors
            print(f"{name}:")
            phase_started = time.monotonic()
            step()
            print(f"  ({time.monotonic() - phase_started:.0f}s)")
        if "chaos" not in phases:
            errors_before_chaos = tally.server_errors
    finally:
        server.stop()
        sink.close()
        sampler.stopped.set()
    tracebacks = server.tracebacks() + sum(other.tracebacks() for other in others)
    lost = sum(o.get("lost", 0) for o in outcomes.values())
    print()
    print(f"requests sent: {tally.sent}; 5xx seen: {tally.server_errors} ({errors_before_chaos} outside chaos and kill); "
          f"no status line: {tally.no_answer}; statuses: {dict(sorted(tally.status.items()))}")
    for name, outcome in outcomes.items():
        print(f"{name}: " + ", ".join(f"{k} {v}" for k, v in outcome.items()))
    print(f"tracebacks in the server log: {tracebacks}")
    print(f"server peak RSS: {sampler.peak_rss / 2**20:.0f} MB; peak open descriptors: {sampler.peak_fds}")
    print(f"time: {time.monotonic() - started:.0f}s; logs in {directory}" if args.keep else f"time: {time.monotonic() - started:.0f}s")
    if errors_before_chaos:
        problems.append(f"{errors_before_chaos} 5xx answers to fuzzed or malformed requests")
    if tracebacks:
        problems.append(f"{tracebacks} tracebacks in the server log")
    if lost:
        problems.append(f"{lost} acknowledged deliveries lost")
    for problem in problems:
        print(f"PROBLEM: {problem}")
    if not args.keep:
        import shutil

        shutil.rmtree(directory, ignore_errors=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
