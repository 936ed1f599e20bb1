"""
The ``hookah`` command, run as a real subprocess against a real Hookah
(in this process, on a loopback port): dispatch, deliveries, retry,
dispatch --from-file with its progress bar, publish, tail (in every stream
format, with reconnects that resume by ``Last-Event-ID``), serve, and the errors people see when
the server is not there. Every child process is bounded in time.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from typing import Any, Dict, List, Optional, Tuple

from twisted.internet import protocol, reactor
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.trial.unittest import TestCase
from twisted.web import server
from twisted.web.resource import Resource

from hookah.model import DELIVERED, FAILED
from tests.support import ROOT, clean_environment, http_client, listen_sink, poll, serve, start_hookah

CLI = [sys.executable, "-m", "hookah.cli.main"]
SCRIPT = os.path.join(ROOT, "bin", "hookah")
LIMIT = 30.0  # seconds any child may run


def environment() -> Dict[str, str]:
    env = clean_environment()
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


class Child(protocol.ProcessProtocol):
    """A child process whose output is collected; ``ended`` fires (code, out, err)."""

    def __init__(self) -> None:
        self.out = b""
        self.err = b""
        self.ended: Deferred = Deferred()
        self.watchers: List[Tuple[bytes, Deferred]] = []
        self.timer: Any = None
        self.signal: Optional[int] = None

    def outReceived(self, data: bytes) -> None:
        self.out += data
        self._check()

    def errReceived(self, data: bytes) -> None:
        self.err += data
        self._check()

    def _check(self) -> None:
        for marker, d in list(self.watchers):
            if marker in self.err or marker in self.out:
                self.watchers.remove((marker, d))
                d.callback(None)

    def seen(self, marker: bytes) -> Deferred:
        d: Deferred = Deferred()
        self.watchers.append((marker, d))
        self._check()
        return d.addTimeout(LIMIT, reactor)

    def processEnded(self, reason: Any) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.signal = getattr(reason.value, "signal", None)
        self.ended.callback((reason.value.exitCode, self.out.decode(), self.err.decode()))


def spawn(testcase: TestCase, args: List[str], command: Optional[List[str]] = None, stdin: Optional[bytes] = None) -> Child:
    child = Child()
    argv = (command or CLI) + args
    transport = reactor.spawnProcess(child, argv[0], argv, env=environment(), path=ROOT)
    if stdin is not None:
        transport.write(stdin)
    transport.closeStdin()

    def kill() -> None:
        try:
            transport.signalProcess("KILL")
        except Exception:
            pass

    child.timer = reactor.callLater(LIMIT, kill)

    def cleanup() -> Deferred:
        if child.ended.called:
            return child.ended
        kill()
        return child.ended

    testcase.addCleanup(cleanup)
    return child


async def run(testcase: TestCase, *args: str, stdin: Optional[bytes] = None, command: Optional[List[str]] = None) -> Tuple[int, str, str]:
    return await spawn(testcase, list(args), command, stdin).ended


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Commands(TestCase):
    timeout = 120

    def test_dispatch_deliveries_retry(self) -> Any:
        async def go() -> None:
            sink, sink_url = listen_sink(self)
            sink.respond = lambda r: (500, {}, b"down")
            service, base = await start_hookah(self)
            code, out, err = await run(
                self, "dispatch", sink_url + "/hook", "--json", '{"n": 1}', "-H", "X-Trace: abc",
                "--retries", "0", "--server", base,
            )
            self.assertEqual(code, 0, err)
            delivery_id = out.strip()
            self.assertEqual(len(delivery_id), 26, out)
            await poll("the delivery to fail", lambda: service.store.get_delivery(delivery_id).addCallback(lambda d: d.status == FAILED), LIMIT)

            code, out, err = await run(self, "deliveries", "--failed", "--server", base)
            self.assertEqual(code, 0, err)
            row = [line for line in out.splitlines() if delivery_id in line]
            self.assertEqual(len(row), 1, out)
            self.assertIn("failed", row[0])
            self.assertIn("500", row[0])

            sink.respond = lambda r: (200, {}, b"ok")
            code, out, err = await run(self, "retry", delivery_id, "--server", base)
            self.assertEqual((code, out.strip()), (0, f"{delivery_id} scheduled"), err)
            received = await sink.wait_for(2)
            self.assertEqual(received[1].body, b'{"n": 1}')
            self.assertEqual(received[1].header("x-trace"), "abc")
            self.assertEqual(received[1].header("content-type"), "application/json")
            await poll("redelivery", lambda: service.store.get_delivery(delivery_id).addCallback(lambda d: d.status == DELIVERED), LIMIT)

            code, out, err = await run(self, "deliveries", "--status", "delivered", "--json-output", "--server", base)
            self.assertEqual(code, 0, err)
            self.assertEqual([d["id"] for d in json.loads(out)["deliveries"]], [delivery_id])

            code, out, err = await run(self, "show", delivery_id, "--server", base)
            self.assertEqual(code, 0, err)
            self.assertEqual([a["status_code"] for a in json.loads(out)["attempts"]], [500, 200])

            code, _, err = await run(self, "retry", "01NOSUCHDELIVERY0000000000", "--server", base)
            self.assertEqual(code, 1)
            self.assertIn("404", err)
            self.assertEqual(len(err.strip().splitlines()), 1, err)

        return ensureDeferred(go())

    def test_dispatch_from_file(self) -> Any:
        async def go() -> None:
            sink, sink_url = listen_sink(self)
            _, base = await start_hookah(self)
            lines = [json.dumps({"url": f"{sink_url}/n{i}", "json": {"i": i}}) for i in range(4)]
            lines.insert(2, "this is not json")
            lines.append(json.dumps({"data": "no destination"}))
            lines.append(json.dumps({"url": f"{sink_url}/text", "data": "plain", "headers": {"X-Kind": "t"}}))
            code, out, err = await run(self, "dispatch", "--from-file", "-", "--server", base, stdin="\n".join(lines).encode() + b"\n")
            self.assertEqual(code, 1, err)  # some lines failed
            self.assertEqual(len(out.split()), 5, out)
            self.assertIn("line 3: not JSON", err)
            self.assertIn('line 6: give exactly one of "url" and "topic"', err)
            self.assertIn("[##############################] 7/7", err)  # the progress bar, full
            self.assertIn("sent 5 of 7", err)
            self.assertIn("2 failed", err)
            received = await sink.wait_for(5)
            bodies = {r.path: r.body for r in received}
            self.assertEqual(bodies["/n3"], b'{"i": 3}')
            self.assertEqual(bodies["/text"], b"plain")
            self.assertEqual([r.header("x-kind") for r in received if r.path == "/text"], ["t"])

        return ensureDeferred(go())

    def test_ignored_fields_are_shown(self) -> Any:
        async def go() -> None:
            sink, sink_url = listen_sink(self)
            _, base = await start_hookah(self)
            form = "application/x-www-form-urlencoded"
            code, out, err = await run(
                self, "dispatch", sink_url + "/form", "--data", "a=1&_method=put&_retry=3", "--content-type", form, "--server", base,
            )
            self.assertEqual(code, 0, err)
            self.assertEqual(len(out.strip()), 26, out)
            self.assertIn("ignored unknown control field(s), not sent to the target: _method, _retry", err)
            [received] = await sink.wait_for(1)
            self.assertEqual(received.body, b"a=1")
            line = json.dumps({"url": f"{sink_url}/batch", "data": "b=2&_token=t", "content_type": form})
            code, out, err = await run(self, "dispatch", "--from-file", "-", "--server", base, stdin=line.encode() + b"\n")
            self.assertEqual(code, 0, err)
            self.assertIn("line 1: ignored unknown control field(s), not sent to the target: _token", err)
            received = await sink.wait_for(2)
            self.assertEqual(received[1].body, b"b=2")

        return ensureDeferred(go())

    def test_token_mints_a_stream_token(self) -> Any:
        async def go() -> None:
            _, base = await start_hookah(self, admin_tokens=("cli-admin",))
            code, out, err = await run(self, "token", "--topic", "orders", "--topic", "news", "--ttl", "60", "--server", base, "--token", "cli-admin")
            self.assertEqual(code, 0, err)
            token = out.strip()
            self.assertTrue(token.startswith("hst1."), out)
            self.assertIn("reads orders, news", err)
            client = http_client(self)
            response = await client.head(f"{base}/stream?topic=news&access_token={token}")
            self.assertEqual(response.code, 200)
            response = await client.head(f"{base}/stream?topic=other&access_token={token}")
            self.assertEqual(response.code, 403)
            # The same token as a bearer header, as `hookah tail --token` sends it.
            bearer = {"Authorization": [f"Bearer {token}"]}
            response = await client.head(f"{base}/stream?topic=news", headers=bearer)
            self.assertEqual(response.code, 200)
            response = await client.head(f"{base}/stream?topic=other", headers=bearer)
            self.assertEqual(response.code, 403)
            response = await client.head(f"{base}/stream?topic=news", headers={"Authorization": ["Bearer hst1.0.W10.forged"]})
            self.assertEqual(response.code, 401)
            tail = spawn(self, ["tail", "orders", "--limit", "1", "--server", base, "--token", token])
            await tail.seen(b"following orders")
            code, _, err = await run(self, "publish", "orders", "--json", '{"n": 1}', "--server", base, "--token", "cli-admin")
            self.assertEqual(code, 0, err)
            code, out, err = await tail.ended
            self.assertEqual(code, 0, err)
            self.assertEqual(json.loads(out.strip().splitlines()[-1])["data"], {"n": 1})
            code, _, err = await run(self, "token", "--topic", "orders", "--server", base)
            self.assertEqual(code, 1)
            self.assertIn("401", err)

        return ensureDeferred(go())

    def test_publish_and_tail(self) -> Any:
        async def go() -> None:
            _, base = await start_hookah(self)
            tail = spawn(self, ["tail", "news", "--limit", "1", "--server", base])
            await tail.seen(b"following news")
            code, out, err = await run(self, "publish", "news", "--json", '{"headline": "hi"}', "--server", base, command=[sys.executable, SCRIPT])
            self.assertEqual(code, 0, err)
            event_id = out.strip()
            code, out, err = await tail.ended
            self.assertEqual(code, 0, err)
            event = json.loads(out.strip().splitlines()[-1])
            self.assertEqual((event["id"], event["topic"], event["data"]), (event_id, "news", {"headline": "hi"}))

        return ensureDeferred(go())

    def test_tail_reconnects_with_last_event_id(self) -> Any:
        async def go() -> None:
            seen: List[Optional[bytes]] = []

            class FlakyStream(Resource):
                isLeaf = True

                def render_GET(self, request: server.Request) -> Any:
                    seen.append(request.getHeader(b"last-event-id"))
                    request.setHeader(b"Content-Type", b"application/json")
                    if len(seen) == 1:
                        request.write(b'{"id":"01A","topic":"t","data":"first"}\r\n\r\n')
                        request.finish()  # the drop
                    elif len(seen) == 2:
                        request.setResponseCode(503)  # still restarting
                        request.write(b'{"error":"down","message":"restarting"}')
                        request.finish()
                    else:
                        request.write(b'{"id":"01B","topic":"t","data":"second"}\r\n')
                    return server.NOT_DONE_YET

            code, out, err = await run(
                self, "tail", "t", "--reconnect-delay", "0.05", "--limit", "2",
                "--server", serve(self, FlakyStream()),
            )
            self.assertEqual(code, 0, err)
            self.assertEqual([json.loads(line)["data"] for line in out.splitlines()], ["first", "second"])
            self.assertEqual(seen, [None, b"01A", b"01A"])
            self.assertIn("reconnecting", err)
            self.assertIn("resuming after 01A", err)

        return ensureDeferred(go())

    def test_tail_warns_of_a_history_gap_and_goes_on(self) -> Any:
        """The server's gap notice is a warning on stderr, never an event on stdout."""

        async def go() -> None:
            history_count = 3
            _, base = await start_hookah(self, history_count=history_count)
            ids = []
            for n in range(5):
                code, out, err = await run(self, "publish", "news", "--json", f'{{"n": {n}}}', "--server", base)
                self.assertEqual(code, 0, err)
                ids.append(out.strip())
            for fmt in ("json", "length", "sse"):
                code, out, err = await run(
                    self, "tail", "news", "--format", fmt, "--last-event-id", ids[0], "--limit", "3", "--server", base, "--quiet",
                )
                self.assertEqual(code, 0, err)
                self.assertEqual([json.loads(line)["id"] for line in out.splitlines()], ids[2:], fmt)
                # Said even with --quiet, which silences the connection notices.
                self.assertIn(f"tail: warning: Event {ids[0]} is no longer in the topic history", err)
                self.assertNotIn("following", err)
                code, out, err = await run(
                    self, "tail", "news", "--format", fmt, "--last-event-id", ids[3], "--limit", "1", "--server", base,
                )
                self.assertEqual(code, 0, err)
                self.assertEqual([json.loads(line)["id"] for line in out.splitlines()], ids[4:], fmt)
                self.assertNotIn("warning", err)

        return ensureDeferred(go())

    def test_tail_reads_every_stream_format(self) -> Any:
        """``--format`` changes what is read off the wire, never what is printed: history and live events alike."""

        async def go() -> None:
            _, base = await start_hookah(self)
            client = http_client(self)
            published = [
                ('{"n": 1, "s": "\u00e9"}'.encode("utf-8"), "application/json"),
                ("two lines\nand a separator \u2028 \u00e9".encode("utf-8"), "text/plain; charset=utf-8"),
                (b"\x00\xff binary", "application/octet-stream"),
            ]

            async def publish(body: bytes, content_type: str) -> str:
                response = await client.post(f"{base}/dispatch?_topic=mix", data=body, headers={"Content-Type": content_type})
                self.assertEqual(response.code, 202)
                return str((await response.json())["id"])

            ids = [await publish(body, content_type) for body, content_type in published]
            # Three from the history (--count 3), then one published live.
            tails = {
                fmt: spawn(self, ["tail", "mix", "--count", "3", "--limit", "4", "--format", fmt, "--server", base])
                for fmt in ("json", "length", "sse")
            }
            for tail in tails.values():
                await tail.seen(b"following mix")
            await poll("three replayed events printed", lambda: all(t.out.count(b"\n") >= 3 for t in tails.values()))
            ids.append(await publish(b'{"live": true}', "application/json"))
            outputs = {}
            for fmt, tail in tails.items():
                code, out, err = await tail.ended
                self.assertEqual(code, 0, f"{fmt}: {err}")
                # One event per "\n" (str.splitlines would also split at the U+2028 inside a string).
                outputs[fmt] = [json.loads(line) for line in out.split("\n") if line]
            self.assertEqual([e["id"] for e in outputs["json"]], ids)
            self.assertEqual(
                [e["data"] for e in outputs["json"]],
                [{"n": 1, "s": "\u00e9"}, "two lines\nand a separator \u2028 \u00e9", "AP8gYmluYXJ5", {"live": True}],
            )
            self.assertEqual(outputs["json"][2]["encoding"], "base64")
            self.assertEqual(outputs["length"], outputs["json"])
            self.assertEqual(outputs["sse"], outputs["json"])

        return ensureDeferred(go())

    def test_tail_stops_when_its_reader_goes_away(self) -> Any:
        """``hookah tail t | head -1``: a closed stdout ends tail (status 0), it is not a dropped stream to resume."""

        async def go() -> None:
            requests: List[server.Request] = []

            class Stream(Resource):
                isLeaf = True

                def render_GET(self, request: server.Request) -> Any:
                    request.setHeader(b"Content-Type", b"application/json")
                    request.write(b"\r\n")
                    requests.append(request)
                    return server.NOT_DONE_YET

            tail = spawn(self, ["tail", "t", "--reconnect-delay", "0.05", "--server", serve(self, Stream())])
            await tail.seen(b"following t")
            await poll("the stream request", lambda: requests)
            tail.transport.closeStdout()  # type: ignore[attr-defined]
            requests[0].write(b'{"id":"01A","topic":"t","data":"nobody reads this"}\r\n')
            code, _, err = await tail.ended
            self.assertEqual(code, 0, err)
            self.assertNotIn("reconnect", err)
            self.assertEqual(len(requests), 1)

        return ensureDeferred(go())

    def test_tail_resumes_after_a_closing_error_or_bad_bytes_in_every_format(self) -> Any:
        async def go() -> None:
            from hookah.model import Event
            from hookah.streams.format import FORMATS, encode_event

            garbage = {"json": b"not json\r\n", "length": b"twelve\r\n", "sse": b"data: not json\n\n"}
            query = {"json": {}, "length": {b"delimited": [b"length"]}, "sse": {b"format": [b"sse"]}}

            def frame(fmt: str, event_id: str, data: str) -> bytes:
                event = Event(event_id, "t", data.encode(), "text/plain")
                return FORMATS[fmt].frame(event, encode_event(event))

            async def check(fmt: str) -> None:
                seen: List[Optional[bytes]] = []
                stream_format = FORMATS[fmt]

                class Stream(Resource):
                    isLeaf = True

                    def render_GET(self, request: server.Request) -> Any:
                        seen.append(request.getHeader(b"last-event-id"))
                        asked = {k: v for k, v in request.args.items() if k != b"topic"}
                        request.setHeader(b"Content-Type", stream_format.content_type)
                        if asked != query[fmt]:
                            request.setResponseCode(400)
                            return json.dumps({"error": "bad_parameter", "message": repr(asked)}).encode()
                        request.write(stream_format.preamble + stream_format.keepalive)
                        if len(seen) == 1:
                            first = frame(fmt, "01A", "first")
                            request.write(first[:7])  # a frame cut across two chunks
                            request.write(first[7:] + stream_format.keepalive)
                            request.write(stream_format.message({"error": "too_slow", "message": "the reader fell behind"}))
                            request.finish()
                        elif len(seen) == 2:
                            request.write(garbage[fmt])  # the connection stays open: tail must leave it
                        else:
                            request.write(frame(fmt, "01B", "second"))
                        return server.NOT_DONE_YET

                code, out, err = await run(
                    self, "tail", "t", "--format", fmt, "--reconnect-delay", "0.05", "--limit", "2",
                    "--server", serve(self, Stream()),
                )
                self.assertEqual(code, 0, f"{fmt}: {err}")
                self.assertEqual([json.loads(line)["data"] for line in out.splitlines()], ["first", "second"], fmt)
                self.assertEqual(seen, [None, b"01A", b"01A"], fmt)
                self.assertIn("the server closed the stream: the reader fell behind; reconnecting", err, fmt)
                self.assertIn("the stream could not be read", err, fmt)

            await DeferredList([ensureDeferred(check(fmt)) for fmt in ("json", "length", "sse")], fireOnOneErrback=True, consumeErrors=True)

        return ensureDeferred(go())


class Errors(TestCase):
    timeout = 60

    def test_server_down(self) -> Any:
        async def go() -> None:
            server = f"http://127.0.0.1:{closed_port()}"
            for args in (["deliveries"], ["dispatch", "https://example.com/", "--data", "x"], ["tail", "t"], ["retry", "X"]):
                code, out, err = await run(self, *args, "--server", server)
                self.assertEqual(code, 3, f"{args}: {err}")
                self.assertEqual(err.strip(), f"hookah: cannot reach Hookah at {server}: connection refused")
                self.assertNotIn("Traceback", err)

        return ensureDeferred(go())

    def test_token_errors_are_explained(self) -> Any:
        async def go() -> None:
            _, base = await start_hookah(self, admin_tokens=("sekrit",))
            code, _, err = await run(self, "deliveries", "--server", base)
            self.assertEqual(code, 1)
            self.assertIn("401 unauthorized", err)
            self.assertIn("give --token or set HOOKAH_TOKEN", err)
            code, out, err = await run(self, "deliveries", "--server", base, "--token", "sekrit")
            self.assertEqual(code, 0, err)

        return ensureDeferred(go())

    def test_usage(self) -> Any:
        async def go() -> None:
            code, out, _ = await run(self, "--help")
            self.assertEqual(code, 0)
            for command in ("dispatch", "publish", "tail", "deliveries", "retry", "serve"):
                self.assertIn(command, out)
            code, out, _ = await run(self, "dispatch", "--help", command=[sys.executable, SCRIPT])
            self.assertEqual(code, 0)
            self.assertIn("--from-file", out)
            code, _, err = await run(self, "dispatch", "https://example.com/", "--json", "{nope")
            self.assertEqual(code, 2)
            self.assertIn("--json is not valid JSON", err)

        return ensureDeferred(go())


class Serve(TestCase):
    timeout = 90

    def test_serve_runs_the_service(self) -> Any:
        async def go() -> None:
            sink, sink_url = listen_sink(self)
            port = closed_port()
            base = f"http://127.0.0.1:{port}"
            server = spawn(self, ["serve", "--storage", "memory:", "--listen", f"tcp:{port}:interface=127.0.0.1",
                                  "--allow-private-targets", "--log-format", "json"])
            await server.seen(b"hookah listening")
            client = http_client(self)
            response = await client.get(base + "/healthz")
            self.assertEqual(response.code, 200)
            code, out, err = await run(self, "dispatch", sink_url + "/x", "--data", "via serve", "--server", base)
            self.assertEqual(code, 0, err)
            received = await sink.wait_for(1)
            self.assertEqual(received[0].body, b"via serve")
            os.kill(server.transport.pid, signal.SIGTERM)  # type: ignore[union-attr]
            code, out, err = await server.ended
            self.assertEqual(code, 0, err)
            lines = [line for line in out.splitlines() if line.strip()]
            records = [json.loads(line) for line in lines]  # every line is one JSON object
            self.assertTrue(any(r.get("message", "").startswith("hookah listening") for r in records))

        return ensureDeferred(go())

    def test_serve_bad_option(self) -> Any:
        async def go() -> None:
            code, out, err = await run(self, "serve", "--port", "eighty")
            self.assertEqual(code, 2)
            self.assertEqual(err.strip(), "hookah: --port must be a whole number, not 'eighty'")

        return ensureDeferred(go())


class TwistdJsonLogs(TestCase):
    timeout = 90

    def test_twistd_log_format_json(self) -> Any:
        """Under twistd, --log-format json replaces twistd's text log: every line is JSON."""

        async def go() -> None:
            port = closed_port()
            twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
            server = spawn(
                self,
                ["-n", "--pidfile=", "hookah", "--storage", "memory:", "--listen", f"tcp:{port}:interface=127.0.0.1", "--log-format", "json", "--access-log"],
                command=[twistd],
            )
            await server.seen(b"hookah listening")
            response = await http_client(self).get(f"http://127.0.0.1:{port}/healthz")
            self.assertEqual(response.code, 200)
            await response.content()
            os.kill(server.transport.pid, signal.SIGTERM)  # type: ignore[union-attr]
            code, out, err = await server.ended
            # twistd ends a SIGTERM'd run by re-raising the signal at itself.
            self.assertEqual((code, server.signal), (None, signal.SIGTERM), err)
            records = [json.loads(line) for line in out.splitlines() if line.strip()]
            messages = [r["message"] for r in records]
            self.assertTrue(any(m.startswith("twistd ") and "starting up" in m for m in messages), messages)
            self.assertTrue(any("GET /healthz" in m for m in messages), messages)  # the access log too
            listening = [r for r in records if r["message"].startswith("hookah listening")]
            self.assertEqual(listening[0]["storage"], "memory:")
            self.assertEqual(listening[0]["level"], "info")

        return ensureDeferred(go())
