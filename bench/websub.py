"""
WebSub fan-out benchmark: how long a Hookah on durable SQLite storage takes
to deliver one event on a topic to all of its 200 WebSub subscribers, and
how many notifications per second it sustains, against the design
target of 10× flask-websub (which fans one update out to 200 subscribers
in ~0.56 s here, so at most 56 ms).

    python bench/websub.py                              # figures on stdout
    python bench/websub.py --readme bench/README.md     # also record them
    python bench/websub.py --twistd /work/venv/bin/twistd --twistd /tmp/pypyvenv/bin/twistd
                                                        # CPython, then PyPy

Three processes, so none measures itself:
- Hookah: ``twistd -n --pidfile= hookah --storage sqlite:<tmp>/hookah.db
  --allow-private-targets --listen tcp:<port>:interface=127.0.0.1
  --public-url http://127.0.0.1:<port>``;
- the subscribers (``--serve-subscribers``): one asyncio process holding
  every callback, keep-alive HTTP/1.1, answering the verification ``GET``
  by echoing ``hub.challenge`` and each content ``POST`` with ``200``,
  checking its ``X-Hub-Signature`` and noting when it arrived
  (``time.monotonic()``, the same clock in every process);
- this process: subscribes the callbacks through ``POST /hub``, waits until
  ``GET /hub/subscriptions?topic=T`` lists them all active, publishes with
  ``POST /dispatch?_topic=T`` and asks the subscriber process when the last
  notification arrived.

Two layouts of the 200 subscriptions, each on its own topic:
- ``hosts``: every callback on its own port (``http://127.0.0.1:<port i>/cb/i``),
  i.e. 200 distinct hosts as Hookah counts them (scheme, name, port), as
  WebSub subscribers on the Internet are;
- ``shared``: all 200 callbacks on one port (``/cb/0`` .. ``/cb/199``), so
  Hookah's per-host limits (``--host-concurrency``, 16) apply to all of them.

Figures per layout:
- one event at a time (the next only after all 200 have the previous):
  fan-out time from sending the publish until the 200th subscriber has the
  notification, p50/p99/min over ``--events`` events after ``--warmup``
  events (the very first, which opens the connections, is shown apart),
  and deliveries/s = 200 / fan-out time;
- sustained: ``--sustained`` events published back to back on one
  keep-alive connection (each after the previous ``202``), total
  deliveries / time from the first publish to the last notification.

Every wait is bounded, the whole run stops within ``--budget`` seconds, and
every process started here is stopped at the end, whatever happens.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple
from urllib.parse import parse_qsl, quote, urlencode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchlib, beside this file
from benchlib import (
    TWISTD, Child, HttpServerProtocol, free_port, machine, percentile, raise_open_files_limit, write_section,
)

SUBSCRIBERS = 200
FLASK_WEBSUB = 0.56  # for comparison: flask-websub fans one update out to 200 subscribers in ~0.56 s
TARGET = FLASK_WEBSUB / 10  # >= 10x flask-websub: 56 ms
TOPIC_BASE = "http://bench.example/websub/"
LAYOUTS = ("hosts", "shared")
LAYOUT_LABEL = {"hosts": "200 hosts (a port each)", "shared": "1 host (200 paths on one port)"}


# -- the subscribers: one asyncio process, every callback ----------------------


class _State:
    def __init__(self, secrets: Dict[str, bytes]) -> None:
        self.secrets = secrets  # callback path -> its hub.secret
        self.times: List[float] = []  # arrival of every content POST, in order
        self.by_seq: Dict[int, List[float]] = {}
        self.seen: Set[Tuple[int, str]] = set()
        self.duplicates = 0
        self.bad_signatures = 0
        self.unreadable = 0
        self.verifications = 0
        self.connections = 0
        self.links: Set[str] = set()
        self.content_types: Set[str] = set()
        self.waiters: List[Tuple[int, asyncio.Future]] = []

    def posted(self, path: str, headers: Dict[str, str], body: bytes) -> None:
        now = time.monotonic()
        self.times.append(now)
        try:
            seq = int(json.loads(body)["seq"])
        except (ValueError, KeyError, TypeError):
            self.unreadable += 1
            seq = -1
        self.by_seq.setdefault(seq, []).append(now)
        if (seq, path) in self.seen:
            self.duplicates += 1
        self.seen.add((seq, path))
        secret = self.secrets.get(path)
        if secret is not None:
            expected = "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
            if headers.get("x-hub-signature") != expected:
                self.bad_signatures += 1
        if len(self.links) < 10:
            self.links.add(headers.get("link", ""))
        if len(self.content_types) < 10:
            self.content_types.add(headers.get("content-type", ""))
        if self.waiters:
            count = len(self.times)
            still = []
            for needed, future in self.waiters:
                if count >= needed:
                    if not future.done():
                        future.set_result(None)
                else:
                    still.append((needed, future))
            self.waiters = still

    async def wait_for(self, count: int, timeout: float) -> None:
        if len(self.times) >= count:
            return
        future = asyncio.get_running_loop().create_future()
        self.waiters.append((count, future))
        try:
            await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            pass

    def stats(self) -> Dict[str, Any]:
        return {
            "posts": len(self.times),
            "verifications": self.verifications,
            "duplicates": self.duplicates,
            "bad_signatures": self.bad_signatures,
            "unreadable": self.unreadable,
            "connections": self.connections,
            "links": sorted(self.links),
            "content_types": sorted(self.content_types),
        }


def _response(status: str, body: bytes, content_type: bytes = b"text/plain") -> bytes:
    return b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s" % (
        status.encode(), content_type, len(body), body)


class _Subscriber(HttpServerProtocol):
    """Every callback (answering verifications and notifications) or, with ``control``, the driver's questions."""

    OK = _response("200 OK", b"")

    def __init__(self, state: _State, control: bool) -> None:
        super().__init__()
        self.state = state
        self.control = control

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        if not self.control:
            self.state.connections += 1

    def request(self, method: str, target: str, headers: Dict[str, str], body: bytes) -> None:
        if self.control:
            asyncio.ensure_future(self.answer_control(target))
        else:
            self.transport.write(self.answer(method, target, headers, body))

    def answer(self, method: str, target: str, headers: Dict[str, str], body: bytes) -> bytes:
        path, _, query = target.partition("?")
        if method == "POST":
            self.state.posted(path, headers, body)
            return self.OK
        params = dict(parse_qsl(query, keep_blank_values=True))
        if "hub.challenge" in params:
            self.state.verifications += 1
            return _response("200 OK", params["hub.challenge"].encode())
        return _response("404 Not Found", b"")

    async def answer_control(self, target: str) -> None:
        path, _, query = target.partition("?")
        params = dict(parse_qsl(query))
        state = self.state
        if path == "/_wait":
            # Until the posts-th notification has arrived (or timeout): the
            # arrival times of sequence number seq, and when posts-th came.
            posts = int(params["posts"])
            await state.wait_for(posts, float(params.get("timeout", "30")))
            answer: Dict[str, Any] = {"posts": len(state.times)}
            answer["at"] = state.times[posts - 1] if len(state.times) >= posts else None
            if "seq" in params:
                answer["times"] = state.by_seq.get(int(params["seq"]), [])
            if "from" in params:
                answer["first"] = state.times[int(params["from"])] if len(state.times) > int(params["from"]) else None
        else:
            answer = state.stats()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(_response("200 OK", json.dumps(answer).encode(), b"application/json"))


def serve_subscribers(callback_ports: int, secrets_seed: str) -> None:
    """Listen on a control port and ``callback_ports`` callback ports; print the ports as JSON."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        state = _State({})
        control = await loop.create_server(lambda: _Subscriber(state, True), "127.0.0.1", 0)
        servers = [control]
        ports = []
        for _ in range(callback_ports):
            server = await loop.create_server(lambda: _Subscriber(state, False), "127.0.0.1", 0, backlog=1024)
            servers.append(server)
            ports.append(server.sockets[0].getsockname()[1])
        # Every callback path has a secret derived from the seed: the driver
        # computes the same ones when it subscribes.
        for n in range(SUBSCRIBERS * len(LAYOUTS)):
            state.secrets[f"/cb/{n}"] = secret_for(secrets_seed, n).encode()
        print(json.dumps({"control": control.sockets[0].getsockname()[1], "callbacks": ports}), flush=True)
        await asyncio.gather(*(s.serve_forever() for s in servers))

    asyncio.run(main())


def event_body(seq: int) -> bytes:
    return json.dumps({"seq": seq, "event": "bench", "data": {"user": 42, "action": "signup"}}, separators=(",", ":")).encode()


def secret_for(seed: str, n: int) -> str:
    return hashlib.sha256(f"{seed}/{n}".encode()).hexdigest()[:32]


# -- the driver's HTTP client ---------------------------------------------------


class Http:
    """One keep-alive connection (``http.client``), reopened if the server closes it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def request(self, method: str, path: str, body: Optional[bytes] = None,
                headers: Optional[Dict[str, str]] = None, timeout: float = 60) -> Tuple[int, bytes]:
        for attempt in (1, 2):
            try:
                self.conn.timeout = timeout
                if self.conn.sock is not None:
                    self.conn.sock.settimeout(timeout)
                self.conn.request(method, path, body=body, headers=headers or {})
                response = self.conn.getresponse()
                data = response.read()
                if response.getheader("connection", "").lower() == "close":
                    self.conn.close()
                return response.status, data
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.conn.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.conn.close()


# -- the measurements ----------------------------------------------------------


class OutOfTime(Exception):
    pass


class Bench:
    """One Hookah (on ``twistd``) and one subscriber process; every layout against them."""

    def __init__(self, args: argparse.Namespace, twistd: str, work: str, deadline: float) -> None:
        self.args = args
        self.twistd = twistd
        self.work = work
        self.deadline = deadline
        self.seed = os.urandom(8).hex()
        self.seq = 0
        self.notes: List[str] = []

    def remaining(self, what: str) -> float:
        left = self.deadline - time.monotonic()
        if left <= 1:
            raise OutOfTime(f"out of time (--budget {self.args.budget:g}s) while {what}")
        return left

    def run(self, layouts: Sequence[str]) -> Dict[str, Any]:
        subscribers = Child("subscribers", [sys.executable, os.path.abspath(__file__), "--serve-subscribers",
                                            str(SUBSCRIBERS + 1), self.seed], self.work, announce=True)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        database = os.path.join(self.work, "hookah.db")
        argv = [self.twistd, "-n", "--pidfile=", "hookah", "--storage", f"sqlite:{database}", "--allow-private-targets",
                "--listen", f"tcp:{port}:interface=127.0.0.1:backlog=1024", "--public-url", base,
                *self.args.hookah_option]
        hookah: Optional[Child] = None
        results: Dict[str, Any] = {"layouts": {}}
        try:
            hookah = Child("hookah", argv, self.work, port=port)
            self.hookah, self.subs = hookah, subscribers
            self.api = Http(port)
            self.control = Http(subscribers.announced["control"])
            ports = subscribers.announced["callbacks"]
            for layout in layouts:
                topic = TOPIC_BASE + layout
                if layout == "hosts":
                    callbacks = [f"http://127.0.0.1:{ports[n]}/cb/{n}" for n in range(SUBSCRIBERS)]
                else:
                    callbacks = [f"http://127.0.0.1:{ports[SUBSCRIBERS]}/cb/{SUBSCRIBERS + n}" for n in range(SUBSCRIBERS)]
                offset = 0 if layout == "hosts" else SUBSCRIBERS
                try:
                    results["layouts"][layout] = self.layout(layout, topic, callbacks, offset)
                except OutOfTime as e:
                    print(f"{layout}: {e}", flush=True)
                    self.notes.append(f"{layout}: {e}")
                    break
            results["stats"] = json.loads(self.control.request("GET", "/_stats")[1])
            results["rss"] = hookah.rss()
            results["notes"] = self.notes
        finally:
            for client in ("api", "control"):
                if hasattr(self, client):
                    getattr(self, client).close()
            if hookah is not None:
                hookah.stop()
            subscribers.stop()
        results["log"] = scan_log(hookah.log_path) if hookah is not None else {}
        return results

    # -- one layout ---------------------------------------------------------------

    def layout(self, layout: str, topic: str, callbacks: List[str], offset: int) -> Dict[str, Any]:
        figures: Dict[str, Any] = {}
        figures["subscribe_seconds"] = self.subscribe(topic, callbacks, offset)
        print(f"{layout}: {SUBSCRIBERS} subscriptions verified in {figures['subscribe_seconds']:.2f} s", flush=True)
        # The first event opens the connections; then a warm-up.
        figures["cold"] = self.one_event(topic, timeout=min(60.0, self.remaining("the first event")))
        print(f"{layout}: first event (new connections): {ms(figures['cold']['fanout'])}", flush=True)
        warm_end = time.monotonic() + self.args.phase_seconds / 3
        warmed = 0
        while warmed < self.args.warmup and time.monotonic() < warm_end:
            self.one_event(topic, timeout=min(60.0, self.remaining("warming up")))
            warmed += 1
        figures["warmup"] = warmed
        # Each event once Hookah has recorded the previous one's outcomes
        # (--gap), then each right after the previous reached all 200.
        figures.update(self.series(layout, topic, self.args.gap))
        if figures["p50"] < 1.0:
            figures["immediate"] = self.series(layout, topic, 0.0)
        else:
            self.notes.append(f"{layout}: no series without a pause (one event takes {figures['p50']:.1f} s)")
        figures["sustained"] = self.sustained(topic, self.args.sustained)
        s = figures["sustained"]
        print(f"{layout}: sustained {s['events']} events back to back: {s['delivered']:,} deliveries in {s['seconds']:.2f} s "
              f"= {s['rate']:,.0f}/s ({s['publish_rate']:,.0f} publishes/s accepted); Hookah CPU {s['hookah_cpu']:.0%}, "
              f"subscribers' CPU {s['subs_cpu']:.0%}{'' if s['complete'] else ' -- INCOMPLETE'}", flush=True)
        return figures

    def series(self, layout: str, topic: str, gap: float) -> Dict[str, Any]:
        """``--events`` events one at a time, each ``gap`` seconds after the previous reached every subscriber."""
        fanouts: List[float] = []
        firsts: List[float] = []
        medians: List[float] = []
        accepts: List[float] = []
        gaps: List[float] = []
        phase_end = time.monotonic() + self.args.phase_seconds
        hookah0, subs0 = self.hookah.cpu_seconds(), self.subs.cpu_seconds()
        for n in range(self.args.events):
            if n >= 3 and time.monotonic() > phase_end:
                self.notes.append(f"{layout}: series with a {gap:g} s pause stopped after {n} events "
                                  f"(--phase-seconds {self.args.phase_seconds:g})")
                break
            time.sleep(gap)
            one = self.one_event(topic, timeout=min(60.0, self.remaining("publishing one event at a time")))
            fanouts.append(one["fanout"])
            firsts.append(one["first"])
            medians.append(one["median"])
            accepts.append(one["accepted"])
            gaps.append(one["tail_gap"])
        time.sleep(gap)  # the last event's recording counts too
        figures: Dict[str, Any] = {
            "gap": gap,
            "events": len(fanouts),
            "fanouts": fanouts,
            "p50": percentile(fanouts, 50),
            "p99": percentile(fanouts, 99),
            "min": min(fanouts),
            "max": max(fanouts),
            "first_p50": percentile(firsts, 50),
            "median_p50": percentile(medians, 50),
            "accepted_p50": percentile(accepts, 50),
            "tail_gap": percentile(gaps, 50),
            "hookah_cpu_per_event": (self.hookah.cpu_seconds() - hookah0) / len(fanouts),
            "subs_cpu_per_event": (self.subs.cpu_seconds() - subs0) / len(fanouts),
        }
        print(f"{layout}: one event at a time x{len(fanouts)}, {gap:g} s pause: fan-out p50 {ms(figures['p50'])}, "
              f"p99 {ms(figures['p99'])}, min {ms(figures['min'])}, max {ms(figures['max'])} = "
              f"{SUBSCRIBERS / figures['p50']:,.0f} deliveries/s at p50; first subscriber after {ms(figures['first_p50'])}, "
              f"median subscriber {ms(figures['median_p50'])}, 202 after {ms(figures['accepted_p50'])}, the later half "
              f"{figures['tail_gap'] * 1000:.2f} ms apart; Hookah CPU "
              f"{ms(figures['hookah_cpu_per_event'])}/event, subscribers' CPU {ms(figures['subs_cpu_per_event'])}/event", flush=True)
        return figures

    def subscribe(self, topic: str, callbacks: List[str], offset: int) -> float:
        started = time.monotonic()
        for n, callback in enumerate(callbacks):
            body = urlencode({"hub.mode": "subscribe", "hub.topic": topic, "hub.callback": callback,
                              "hub.lease_seconds": "3600", "hub.secret": secret_for(self.seed, offset + n)}).encode()
            for _ in range(20):
                status, answer = self.api.request("POST", "/hub", body, {"Content-Type": "application/x-www-form-urlencoded"})
                if status != 503:
                    break
                time.sleep(0.5)
            if status != 202:
                raise SystemExit(f"subscribing {callback} got HTTP {status}: {answer[:300]!r}")
        wanted = set(callbacks)
        while True:
            left = self.remaining("waiting for the verifications")
            status, answer = self.api.request("GET", "/hub/subscriptions?" + urlencode({"topic": topic}))
            if status != 200:
                raise SystemExit(f"listing subscriptions got HTTP {status}: {answer[:300]!r}")
            active = {s["callback"] for s in json.loads(answer)["subscriptions"] if s.get("active")}
            if wanted <= active:
                return time.monotonic() - started
            if time.monotonic() - started > min(60.0, left):
                raise SystemExit(f"only {len(wanted & active)} of {len(wanted)} subscriptions verified after 60 s")
            time.sleep(0.05)

    def publish_request(self, topic: str) -> Tuple[int, bytes, str]:
        self.seq += 1
        body = event_body(self.seq)
        path = "/dispatch?_topic=" + quote(topic, safe="")
        return self.seq, body, path

    def check_accepted(self, status: int, answer: bytes) -> None:
        if status != 202:
            raise SystemExit(f"publish got HTTP {status}: {answer[:300]!r}")
        count = json.loads(answer).get("subscribers")
        if count != SUBSCRIBERS:
            raise SystemExit(f"publish reached {count} subscribers, not {SUBSCRIBERS}: {answer[:300]!r}")

    def posts(self) -> int:
        return int(json.loads(self.control.request("GET", "/_stats")[1])["posts"])

    def one_event(self, topic: str, timeout: float) -> Dict[str, float]:
        base = self.posts()
        seq, body, path = self.publish_request(topic)
        sent = time.monotonic()
        status, answer = self.api.request("POST", path, body, {"Content-Type": "application/json"})
        accepted = time.monotonic() - sent
        self.check_accepted(status, answer)
        _, waited = self.control.request("GET", f"/_wait?posts={base + SUBSCRIBERS}&seq={seq}&timeout={timeout:.1f}",
                                         timeout=timeout + 10)
        result = json.loads(waited)
        times = sorted(result["times"])
        if len(times) < SUBSCRIBERS:
            self.remaining(f"waiting for event {seq} ({len(times)} of {SUBSCRIBERS} notifications so far)")
            raise SystemExit(f"event {seq}: only {len(times)} of {SUBSCRIBERS} notifications within {timeout:.0f} s")
        if result["posts"] != base + SUBSCRIBERS:
            self.notes.append(f"event {seq}: {result['posts'] - base} notifications arrived for {SUBSCRIBERS} subscribers")
        tail = times[SUBSCRIBERS // 2 :]
        return {
            "tail_gap": percentile([b - a for a, b in zip(tail, tail[1:])], 50),
            "fanout": times[SUBSCRIBERS - 1] - sent,
            "first": times[0] - sent,
            "median": times[SUBSCRIBERS // 2] - sent,
            "accepted": accepted,
        }

    def sustained(self, topic: str, events: int) -> Dict[str, Any]:
        base = self.posts()
        hookah0, subs0 = self.hookah.cpu_seconds(), self.subs.cpu_seconds()
        started = time.monotonic()
        for _ in range(events):
            self.remaining("publishing back to back")
            _, body, path = self.publish_request(topic)
            status, answer = self.api.request("POST", path, body, {"Content-Type": "application/json"})
            self.check_accepted(status, answer)
        published = time.monotonic() - started
        wanted = base + events * SUBSCRIBERS
        timeout = min(self.args.sustained_timeout, self.remaining("waiting for the sustained run") - 2)
        _, waited = self.control.request("GET", f"/_wait?posts={wanted}&timeout={timeout:.1f}", timeout=timeout + 10)
        result = json.loads(waited)
        complete = result["at"] is not None
        if complete:
            seconds = result["at"] - started
        else:
            seconds = time.monotonic() - started
            self.notes.append(f"sustained run on {topic}: {result['posts'] - base} of {events * SUBSCRIBERS} "
                              f"notifications within {timeout:.0f} s")
        wall = time.monotonic() - started
        delivered = min(result["posts"], wanted) - base
        return {
            "events": events,
            "delivered": delivered,
            "seconds": seconds,
            "rate": delivered / seconds,
            "publish_rate": events / published,
            "hookah_cpu": (self.hookah.cpu_seconds() - hookah0) / wall,
            "subs_cpu": (self.subs.cpu_seconds() - subs0) / wall,
            "complete": complete,
        }


def scan_log(path: str) -> Dict[str, Any]:
    """Tracebacks and warnings/errors in Hookah's log, for the report."""
    found: Dict[str, Any] = {"tracebacks": 0, "lines": []}
    try:
        with open(path, errors="replace") as f:
            for line in f:
                if "Traceback" in line:
                    found["tracebacks"] += 1
                lowered = line.lower()
                if ("error" in lowered or "warn" in lowered or "failed" in lowered or "traceback" in lowered) \
                        and len(found["lines"]) < 20:
                    found["lines"].append(line.rstrip())
    except OSError:
        pass
    return found


def ms(seconds: Optional[float]) -> str:
    if seconds is None:
        return "n/a"
    return f"{seconds:.2f} s" if seconds >= 1 else f"{seconds * 1000:.1f} ms"


def interpreter(twistd: str) -> str:
    """``CPython 3.11.7, Twisted 26.10.0``: what a twistd runs on (the python next to it)."""
    python = os.path.join(os.path.dirname(twistd), "python")
    try:
        out = subprocess.run(
            [python, "-c", "import platform, twisted; print(platform.python_implementation(), "
                           "platform.python_version() + ',', 'Twisted', twisted.__version__)"],
            capture_output=True, timeout=60, check=True,
        ).stdout.decode().strip()
        return out or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# -- the README section ----------------------------------------------------------


def section(info: Dict[str, str], args: argparse.Namespace, runs: List[Tuple[str, Dict[str, Any]]]) -> str:
    command = "python bench/websub.py" + "".join(f" --twistd {t}" for t in args.twistd or [])
    lines = [
        "## WebSub",
        "",
        f"`{command}` on {info['date']}: {info['nproc']} CPUs ({info['cpu']}), driver and subscribers on "
        f"{info['python']}; 1-minute load average {info['load']} when it started (other work on the machine skews "
        "figures). Hookah as `twistd -n hookah --storage sqlite:<tmp>/hookah.db --allow-private-targets --public-url ...` "
        f"(default settings otherwise) in its own process; {SUBSCRIBERS} subscriptions per topic through `POST /hub`, each "
        "with a `hub.secret` (so every notification is signed), verified by a minimal asyncio HTTP/1.1 server in a "
        "second process that holds every callback (keep-alive; it checks each `X-Hub-Signature` and that no "
        "subscriber gets an event twice); events published with `POST /dispatch?_topic=` "
        f"({len(event_body(1000))}-byte JSON body) from a third.",
        "",
        "| Hookah on | subscribers | fan-out p50 | p99 | min | deliveries/s at p50 | p50, no pause between events | "
        "first event (new connections) | sustained deliveries/s | Hookah CPU, sustained | subscribers' CPU, sustained |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, result in runs:
        for layout, f in result["layouts"].items():
            s = f["sustained"]
            sustained = f"{s['rate']:,.0f}" + ("" if s["complete"] else " (incomplete)")
            immediate = ms(f["immediate"]["p50"]) if "immediate" in f else "–"
            lines.append(
                f"| {label} | {LAYOUT_LABEL[layout]} | **{ms(f['p50'])}** | {ms(f['p99'])} | {ms(f['min'])} | "
                f"{SUBSCRIBERS / f['p50']:,.0f} | {immediate} | {ms(f['cold']['fanout'])} | {sustained} | "
                f"{s['hookah_cpu']:.0%} | {s['subs_cpu']:.0%} |"
            )
    lines += ["", verdict(runs), ""]
    for _label, result in runs:
        for layout, f in result["layouts"].items():
            s = f["sustained"]
            lines.append(
                f"- {result['interpreter']}, {LAYOUT_LABEL[layout]}: {f['events']} events one at a time after "
                f"{f['warmup']} warm-up events; p50s: first subscriber after {ms(f['first_p50'])}, median subscriber "
                f"{ms(f['median_p50'])}, the publish's `202` after {ms(f['accepted_p50'])}, the later 100 notifications "
                f"{f['tail_gap'] * 1000:.2f} ms apart (median gap){pacing(f)}; per event, Hookah CPU "
                f"{ms(f['hookah_cpu_per_event'])} and the subscribers' {ms(f['subs_cpu_per_event'])}; the "
                f"{SUBSCRIBERS} subscriptions verified {f['subscribe_seconds']:.2f} s after the first `POST /hub`; "
                f"sustained: {s['events']} events, {s['delivered']:,} deliveries in {s['seconds']:.2f} s, publishes "
                f"accepted at {s['publish_rate']:,.0f}/s; Hookah RSS at the end {result['rss'] / 2**20:.0f} MiB."
            )
    for label, result in runs:
        if result.get("notes"):
            lines.append(f"- Notes on the {label} run: " + "; ".join(result["notes"]) + ".")
    lines += [
        "",
        "How to read it:",
        "",
        "- *Fan-out*: from sending `POST /dispatch?_topic=` until the 200th subscriber has received the notification "
        "(arrival times noted by the subscriber process with `time.monotonic()`, the clock all processes share), one "
        f"event at a time: each published {args.gap:g} s after the previous reached all 200, time for Hookah to record "
        "the previous outcomes. *No pause*: the same, each published as soon as the previous reached all 200, so it "
        "meets the recording of the previous event's 200 outcomes. Deliveries/s = 200 / fan-out p50. An event is "
        "stored with its 200 deliveries in one SQLite transaction before its `202`; the deliveries start as that "
        "transaction commits, before the `202` is written.",
        "- *Subscribers*: \"200 hosts\" gives each callback its own port, so each is a separate host to Hookah (scheme, "
        "name, port), as WebSub subscribers on the Internet are; \"1 host\" puts all 200 callbacks on one port "
        "(paths `/cb/<n>`), where Hookah's per-host limit (`--host-concurrency`, 16 attempts in flight) and its "
        "busy-host deferrals apply.",
        "- *Sustained*: events published back to back on one keep-alive connection (each after the previous `202`), "
        "deliveries / time from the first publish to the last notification; CPU is the share of one core over that time.",
        "",
        f"Design target: WebSub fan-out to 200 subscribers ≥ 10× flask-websub, which takes ~{FLASK_WEBSUB:.2f} s "
        f"on this machine: at most {TARGET * 1000:.0f} ms, i.e. ≥ {SUBSCRIBERS / TARGET:,.0f} deliveries/s.",
        "",
        "Run it: `python bench/websub.py` (a minute or two per `twistd`; `--events`, `--gap`, `--sustained`, `--budget`, "
        "`--layouts hosts,shared`, `--hookah-option=--host-concurrency=64` and others: `--help`); `--twistd PATH` "
        "(repeatable) runs Hookah with another `twistd`, e.g. one in a PyPy virtualenv; `--readme bench/README.md` "
        "rewrites this section.",
        "",
    ]
    return "\n".join(lines)


def pacing(f: Dict[str, Any]) -> str:
    """Why notifications to one host trickle in, when they do."""
    if f["tail_gap"] < 0.01:
        return ""
    return (" — Hookah's pace for deliveries it pushed back because their host was busy: a host it has not yet "
            "measured is assumed to take 1 s per attempt, so they are spaced 1 s / `--host-concurrency` apart")


def verdict(runs: List[Tuple[str, Dict[str, Any]]]) -> str:
    parts = []
    for label, result in runs:
        for layout, f in result["layouts"].items():
            times = FLASK_WEBSUB / f["p50"]
            speed = f"{times:.0f}×" if times >= 10 else f"{times:.2g}×"
            also = f"; p99 {ms(f['p99'])}"
            if "immediate" in f:
                also += f", p50 with no pause {ms(f['immediate']['p50'])}"
            if f["p50"] <= TARGET:
                parts.append(f"- {label}, {LAYOUT_LABEL[layout]}: target met, p50 {ms(f['p50'])} ≤ {TARGET * 1000:.0f} ms "
                             f"({speed} flask-websub{also}).")
            else:
                parts.append(f"- {label}, {LAYOUT_LABEL[layout]}: **below target**, p50 {ms(f['p50'])} > "
                             f"{TARGET * 1000:.0f} ms ({speed} flask-websub{also}).")
    return "\n".join(parts)


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--serve-subscribers"]:
        return serve_subscribers(int(argv[1]), argv[2])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20, help="events published one at a time, measured [20]")
    parser.add_argument("--warmup", type=int, default=50,
                        help="events before measuring, after the first (for at most a third of --phase-seconds; PyPy needs them) [50]")
    parser.add_argument("--gap", type=float, default=0.1,
                        help="seconds between an event reaching every subscriber and the next publish, "
                             "for Hookah to record the outcomes; a second series runs without a pause [0.1]")
    parser.add_argument("--sustained", type=int, default=50, help="events published back to back [50]")
    parser.add_argument("--sustained-timeout", type=float, default=60.0, help="seconds to wait for a sustained run's deliveries [60]")
    parser.add_argument("--phase-seconds", type=float, default=30.0,
                        help="stop the one-at-a-time phase of a layout after this long (at least 3 events) [30]")
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help=f"subscriber layouts, comma-separated [{','.join(LAYOUTS)}]")
    parser.add_argument("--budget", type=float, default=180.0, help="seconds per twistd before giving up [180]")
    parser.add_argument("--hookah-option", action="append", default=[], help="extra hookah option (repeatable), e.g. --hookah-option=--host-concurrency=64")
    parser.add_argument("--twistd", action="append", help="the twistd to run Hookah with (repeatable: one run each) [next to this Python]")
    parser.add_argument("--readme", help="write the figures into this Markdown file's WebSub section")
    args = parser.parse_args(argv)
    layouts = [layout for layout in args.layouts.split(",") if layout]
    for layout in layouts:
        if layout not in LAYOUTS:
            parser.error(f"unknown layout {layout!r}: {', '.join(LAYOUTS)}")
    raise_open_files_limit()  # inherited by the subscriber process
    info = machine()
    twistds = args.twistd or [TWISTD]
    print(f"{info['date']}: {info['nproc']} CPUs ({info['cpu']}), {info['python']}, load average {info['load']}", flush=True)
    runs: List[Tuple[str, Dict[str, Any]]] = []
    for twistd in twistds:
        description = interpreter(twistd)
        label = description.split(",")[0]
        work = tempfile.mkdtemp(prefix="hookah-bench-websub-")
        print(f"Hookah on {description} ({twistd}); logs in {work}", flush=True)
        bench = Bench(args, twistd, work, time.monotonic() + args.budget)
        result = bench.run(layouts)
        result["interpreter"] = description
        stats = result.get("stats", {})
        print(f"subscriber process: {stats.get('posts')} notifications, {stats.get('verifications')} verifications, "
              f"{stats.get('connections')} connections from Hookah, {stats.get('duplicates')} duplicates, "
              f"{stats.get('bad_signatures')} bad signatures, {stats.get('unreadable')} unreadable; "
              f"Link headers {stats.get('links')}; Content-Types {stats.get('content_types')}; "
              f"Hookah RSS {result.get('rss', 0) / 2**20:.0f} MiB", flush=True)
        log = result.get("log", {})
        if log.get("tracebacks") or log.get("lines"):
            print(f"Hookah's log ({log.get('tracebacks')} tracebacks):\n  " + "\n  ".join(log.get("lines", [])), flush=True)
        for note in result.get("notes", []):
            print(f"note: {note}", flush=True)
        if result["layouts"]:
            runs.append((label, result))
        if log.get("tracebacks"):
            print(f"logs kept in {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)
    if args.readme and runs:
        write_section(args.readme, "WebSub", section(info, args, runs))
        print(f"wrote the WebSub section of {args.readme}")


if __name__ == "__main__":
    main()
