"""
The real ``twistd -n hookah`` process, end to end.

- ``twistd`` finds the ``hookah`` plugin.
- A bad option stops start-up with one line on stderr, a non-zero exit
  status and no traceback.
- Durability: 100 webhooks accepted (``202``) while their target is down
  survive a ``SIGKILL`` of the server and all arrive once it is restarted on
  the same SQLite file with the target up (at least once: duplicates are
  allowed, losses are not).

Every wait polls against a deadline; no sleep decides an outcome. Every
process started here is killed in cleanup.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from typing import Any, List, Optional
from urllib.parse import quote

from twisted.internet.defer import Deferred, ensureDeferred, gatherResults
from twisted.trial.unittest import TestCase

from tests.support import clean_environment, http_client, listen_sink, poll, temp_dir

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
WAIT = 60.0  # seconds any single condition may take before the test fails


def run_twistd(args: List[str], cwd: str, timeout: float = WAIT) -> subprocess.CompletedProcess:
    """Run ``twistd -n --pidfile= hookah <args>`` to completion (bounded)."""
    return subprocess.run(
        [TWISTD, "-n", "--pidfile=", "hookah", *args],
        cwd=cwd,
        env=clean_environment(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=timeout,
    )


class HookahProcess:
    """One ``twistd -n hookah`` child on an OS-chosen loopback port."""

    count = 0

    def __init__(self, testcase: TestCase, directory: str, args: List[str]) -> None:
        HookahProcess.count += 1
        self.log_path = os.path.join(directory, f"twistd-{HookahProcess.count}.log")
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "hookah", "--listen", "tcp:0:interface=127.0.0.1", *args],
            cwd=directory,
            env=clean_environment(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.url = ""
        testcase.addCleanup(self.stop)

    def log(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    async def started(self) -> str:
        """The base URL once the web port listens; fails if the process dies."""

        def listening() -> Optional[str]:
            text = self.log()
            port = re.search(r"starting on (\d+)", text)
            if port and "hookah listening on" in text:
                return f"http://127.0.0.1:{port.group(1)}"
            if self.process.poll() is not None:
                raise AssertionError(f"twistd exited with {self.process.returncode} before listening:\n{text}")
            return None

        self.url = await poll("twistd hookah to listen", listening, WAIT, interval=0.1)
        return self.url

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, whatever was not committed is lost."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=WAIT)

    def terminate(self) -> int:
        """SIGTERM, and the exit status of a graceful stop."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=WAIT)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=WAIT)
        self._log.close()


def reserve_port(testcase: TestCase) -> socket.socket:
    """
    A loopback port that is bound but not listening: connections to it are
    refused (the target is down), and no other process can take it before
    the sink is started there.
    """
    reserved = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    reserved.bind(("127.0.0.1", 0))
    testcase.addCleanup(reserved.close)
    return reserved


class PluginTests(TestCase):
    def test_twistd_finds_the_hookah_plugin(self) -> None:
        from twisted.application.service import IServiceMaker
        from twisted.plugin import getPlugins

        from hookah.tap import Options

        plugins = {p.tapname: p for p in getPlugins(IServiceMaker)}
        self.assertIn("hookah", plugins)
        self.assertIsInstance(plugins["hookah"].options(), Options)

    def test_twistd_lists_hookah(self) -> None:
        result = subprocess.run(
            [TWISTD, "--help"], env=clean_environment(), capture_output=True, timeout=WAIT, stdin=subprocess.DEVNULL
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertRegex(result.stdout.decode(), r"(?m)^\s+hookah\s")

    def test_hookah_help(self) -> None:
        result = run_twistd(["--help"], temp_dir(self))
        self.assertEqual(result.returncode, 0, result.stderr)
        for option in ("--port", "--interface", "--storage", "--config", "--allow-private-targets", "--retry-schedule"):
            self.assertIn(option, result.stdout.decode())


class BadOptionTests(TestCase):
    """A bad value stops the real process with one clear line, no traceback."""

    def assert_one_line(self, args: List[str], *expected: str) -> str:
        directory = temp_dir(self)
        result = run_twistd(args, directory)
        stdout, stderr = result.stdout.decode(), result.stderr.decode()
        self.assertNotEqual(result.returncode, 0, stdout + stderr)
        self.assertNotIn("Traceback", stdout + stderr)
        lines = [line for line in stderr.splitlines() if line.strip()]
        self.assertEqual(len(lines), 1, stderr)
        for text in expected:
            self.assertIn(text, lines[0])
        # Nothing was started: no database file was created.
        self.assertFalse(os.path.exists(os.path.join(directory, "hookah.db")))
        return lines[0]

    def test_non_numeric_port(self) -> None:
        self.assert_one_line(["--port", "abc"], "--port", "abc")

    def test_port_out_of_range(self) -> None:
        self.assert_one_line(["--port", "70000"], "--port")

    def test_unknown_storage_scheme(self) -> None:
        self.assert_one_line(["--storage", "foo:"], "--storage", "foo:")

    def test_missing_config_file(self) -> None:
        self.assert_one_line(["--config", "/nonexistent"], "/nonexistent")

    def test_bad_value_in_config_file(self) -> None:
        directory = temp_dir(self)
        path = os.path.join(directory, "hookah.toml")
        with open(path, "w") as f:
            f.write('[hookah]\ntimeout = "soon"\n')
        self.assert_one_line(["--config", path], "--timeout")

    def test_bad_retry_schedule(self) -> None:
        self.assert_one_line(["--retry-schedule", "5,x"], "--retry-schedule")


class StartFailureTests(TestCase):
    """
    A value that passes the option checks but cannot be used at start-up
    (a database path that cannot be opened, a port already taken) should
    stop the process just as clearly: non-zero status, no traceback.
    """

    def assert_stops_clearly(self, args: List[str], *expected: str) -> None:
        try:
            result = run_twistd(args, temp_dir(self), timeout=15)
        except subprocess.TimeoutExpired as e:
            raise AssertionError(f"twistd was still running after 15 s:\n{(e.stdout or b'').decode()}")
        output = result.stdout.decode() + result.stderr.decode()
        self.assertNotEqual(result.returncode, 0, output)
        self.assertNotIn("Traceback", output)
        # One line says why (in twistd's log, which -n sends to stdout).
        reasons = [line for line in output.splitlines() if "cannot start" in line]
        self.assertEqual(len(reasons), 1, output)
        for text in expected:
            self.assertIn(text, reasons[0])

    def taken_port(self) -> str:
        """A loopback port another socket is listening on."""
        taken = reserve_port(self)
        taken.listen(1)
        return str(taken.getsockname()[1])

    def test_unopenable_database(self) -> None:
        self.assert_stops_clearly(["--port", "0", "--storage", "sqlite:/nonexistent/dir/hookah.db"], "database")

    def test_port_in_use_memory_storage(self) -> None:
        port = self.taken_port()
        self.assert_stops_clearly(["--port", port, "--interface", "127.0.0.1", "--storage", "memory:"], port)

    def test_port_in_use_sqlite_storage(self) -> None:
        port = self.taken_port()
        self.assert_stops_clearly(["--port", port, "--interface", "127.0.0.1", "--storage", "sqlite:hookah.db"], port)


class DurabilityTests(TestCase):
    COUNT = 100

    def test_accepted_webhooks_survive_sigkill(self) -> Deferred:
        return ensureDeferred(self._survive_sigkill())

    test_accepted_webhooks_survive_sigkill.timeout = 6 * WAIT  # type: ignore[attr-defined]

    async def _survive_sigkill(self) -> None:
        directory = temp_dir(self)
        database = os.path.join(directory, "hookah.db")
        # --retry-schedule 1 retries every second (+-20%); _retries keeps each
        # delivery retrying well past the kill instead of failing after the
        # schedule's single retry while the target is down. Should the
        # target's circuit breaker trip while it is down, a short cooldown
        # keeps its pauses short (PausedRestartTests shows that a restart
        # releases what a pause held).
        args = [
            "--storage", f"sqlite:{database}", "--allow-private-targets",
            "--retry-schedule", "1", "--breaker-cooldown", "0.25",
        ]
        reserved = reserve_port(self)
        sink_port = reserved.getsockname()[1]
        target = f"http://127.0.0.1:{sink_port}/hook"
        client = http_client(self)

        first = HookahProcess(self, directory, args)
        base = await first.started()

        async def dispatch(n: int) -> str:
            response = await client.post(
                f"{base}/dispatch?_url={quote(target, safe='')}&_retries=100",
                data=json.dumps({"n": n}).encode(),
                headers={b"Content-Type": [b"application/json"]},
            )
            body = await response.content()
            self.assertEqual(response.code, 202, body)
            reply = json.loads(body)
            self.assertEqual(reply["status"], "scheduled")
            self.assertEqual(response.headers.getRawHeaders(b"location"), [f"/dispatch/{reply['id']}".encode()])
            return reply["id"]

        ids: List[str] = await gatherResults([ensureDeferred(dispatch(n)) for n in range(self.COUNT)])
        self.assertEqual(len(set(ids)), self.COUNT)

        # The target is down: wait until attempts have been refused, so the
        # kill hits deliveries mid-retry (the breaker keeps some of them from
        # being tried at all: those are simply scheduled).
        async def refused() -> bool:
            response = await client.get(f"{base}/dispatch?limit=1000")
            page = json.loads(await response.content())["deliveries"]
            self.assertEqual({d["id"] for d in page}, set(ids))
            self.assertEqual({d["status"] for d in page} - {"scheduled", "delivering"}, set())
            return sum(len(d["attempts"]) for d in page) >= 10

        await poll("refused attempts to be recorded", refused, WAIT, interval=0.2)
        first.kill()
        self.assertEqual(first.process.returncode, -signal.SIGKILL)

        # The target comes up on its port; a new server opens the same file.
        reserved.close()
        sink, _ = listen_sink(self, port=sink_port)
        second = HookahProcess(self, directory, args)
        base = await second.started()

        def bodies() -> set:
            return {r.body for r in sink.received}

        expected = {json.dumps({"n": n}).encode() for n in range(self.COUNT)}
        await poll(f"all {self.COUNT} webhooks at the sink", lambda: bodies() >= expected, WAIT, interval=0.1)
        self.assertEqual(bodies(), expected)  # nothing but ours
        for received in sink.received:
            self.assertEqual((received.method, received.path), ("POST", "/hook"))
            self.assertEqual(received.header("content-type"), "application/json")

        async def all_delivered() -> bool:
            replies = await gatherResults([ensureDeferred(treq_json(client, f"{base}/dispatch/{i}")) for i in ids])
            return all(r["status"] == "delivered" for r in replies)

        await poll("GET /dispatch/<id> to say delivered for all", all_delivered, WAIT, interval=0.2)
        reply = await treq_json(client, f"{base}/dispatch/{ids[0]}")
        self.assertEqual(reply["id"], ids[0])
        self.assertEqual(reply["url"], target)
        self.assertEqual(reply["attempts"][-1]["status_code"], 200)
        self.assertTrue(all(a["status_code"] is None for a in reply["attempts"][:-1]), reply)

        # And a graceful stop of the restarted server ends cleanly. (twistd
        # re-raises the stopping signal once shut down, so the status is
        # -SIGTERM rather than 0.)
        self.assertIn(second.terminate(), (0, -signal.SIGTERM))
        log = second.log()
        self.assertIn("Server Shut Down.", log)
        self.assertNotIn("Traceback", log)


class PausedRestartTests(TestCase):
    """
    The kill -9 variant of a short outage: deliveries that a host pause
    pushed far out (a long first pause here) are due at once after a
    restart with the receiver up, not at their stored time.
    """

    COUNT = 50
    PAUSE = 60.0  # the stored deferrals are about this far out
    AFTER_RESTART = 30.0  # generous; the stored times would be twice that

    def test_a_restart_releases_what_a_pause_held(self) -> Deferred:
        return ensureDeferred(self._restart())

    test_a_restart_releases_what_a_pause_held.timeout = 6 * WAIT  # type: ignore[attr-defined]

    async def _restart(self) -> None:
        directory = temp_dir(self)
        args = [
            "--storage", f"sqlite:{os.path.join(directory, 'hookah.db')}", "--allow-private-targets",
            "--retry-schedule", "0.2,0.4,0.8", "--breaker-window", "0.5",
            "--breaker-pause", f"{self.PAUSE:g}", "--breaker-cooldown", f"{2 * self.PAUSE:g}",
        ]
        reserved = reserve_port(self)
        sink_port = reserved.getsockname()[1]
        target = f"http://127.0.0.1:{sink_port}/hook"
        client = http_client(self)
        first = HookahProcess(self, directory, args)
        base = await first.started()

        async def dispatch(n: int) -> str:
            response = await client.post(
                f"{base}/dispatch?_url={quote(target, safe='')}&_retries=40",
                data=json.dumps({"n": n}).encode(),
                headers={b"Content-Type": [b"application/json"]},
            )
            body = await response.content()
            self.assertEqual(response.code, 202, body)
            return str(json.loads(body)["id"])

        ids: List[str] = await gatherResults([ensureDeferred(dispatch(n)) for n in range(self.COUNT)])

        # Refused for longer than --breaker-window: the host is paused, and
        # every delivery says so, with the time of the host's next probe.
        async def all_paused() -> bool:
            page = (await treq_json(client, f"{base}/dispatch?limit=1000"))["deliveries"]
            self.assertEqual({d["id"] for d in page}, set(ids))
            waiting = [d["waiting"] for d in page if d["status"] == "scheduled"]
            return len(waiting) == self.COUNT and all(w["reason"] == "host_paused" for w in waiting)

        await poll("every delivery to wait for its paused host", all_paused, WAIT, interval=0.2)
        page = (await treq_json(client, f"{base}/dispatch?limit=1000"))["deliveries"]
        for d in page:
            latest = max(a["at"] for a in d["attempts"]) if d["attempts"] else d["created_at"]
            self.assertGreater(d["waiting"]["until"], latest + self.PAUSE / 2, d)
            self.assertIsNotNone(d["waiting"]["probe_at"], d)
            self.assertEqual(d["waiting"]["host"], f"http://127.0.0.1:{sink_port}", d)
        first.kill()
        self.assertEqual(first.process.returncode, -signal.SIGKILL)

        reserved.close()
        sink, _ = listen_sink(self, port=sink_port)
        second = HookahProcess(self, directory, args)
        base = await second.started()
        restarted = time.monotonic()
        expected = {json.dumps({"n": n}).encode() for n in range(self.COUNT)}
        await poll(f"all {self.COUNT} webhooks at the sink", lambda: {r.body for r in sink.received} >= expected, 2 * WAIT)
        took = time.monotonic() - restarted
        self.assertLessEqual(took, self.AFTER_RESTART, f"the last webhook arrived {took:.1f}s after the restart")
        self.assertEqual({r.body for r in sink.received}, expected)


async def treq_json(client: Any, url: str) -> Any:
    response = await client.get(url)
    body = await response.content()
    if response.code != 200:
        raise AssertionError(f"GET {url}: {response.code} {body!r}")
    return json.loads(body)
