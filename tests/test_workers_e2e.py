"""
``twistd hookah --workers 2``: a master process holding the listening
socket and two worker processes sharing it, on one PostgreSQL database.

Which worker a connection reached is what ``/healthz`` says on it
(``"worker"``); the tests keep such connections open and use them again.
Every wait polls against a deadline; no sleep decides an outcome.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
from collections import Counter
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import quote, urlsplit

from twisted.internet.defer import ensureDeferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from hookah.config import ConfigError, build_config
from tests.pgsupport import fresh_database
from tests.support import http_client, listen_sink, poll, temp_dir
from tests.test_e2e_durability import WAIT, HookahProcess

LEASE = 3.0  # --claim-lease of these servers


class SharedSocketTests(TestCase):
    def test_workers_need_a_socket_they_can_share(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            build_config({"workers": "2", "storage": "postgresql://h/db", "listen": "ssl:8443:privateKey=k.pem"}, {})
        self.assertIn("tcp:", str(caught.exception))


class Connection:
    """A keep-alive connection to the server, and the worker it reached."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.http = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=WAIT)
        self.http.request("GET", "/healthz")
        response = self.http.getresponse()
        self.worker: int = json.loads(response.read())["worker"]

    def request(self, method: str, path: str, body: bytes = b"") -> Tuple[int, Dict[str, Any]]:
        headers = {"Content-Type": "application/json"} if body else {}
        self.http.request(method, path, body=body or None, headers=headers)
        response = self.http.getresponse()
        return response.status, json.loads(response.read())

    def close(self) -> None:
        self.http.close()


def connections_to_each_worker(url: str, workers: int = 2, tries: int = 400) -> Dict[int, Connection]:
    """One open connection to each worker (new connections until every one was reached)."""
    found: Dict[int, Connection] = {}
    for _ in range(tries):
        connection = Connection(url)
        if connection.worker in found:
            connection.close()
        else:
            found[connection.worker] = connection
        if len(found) == workers:
            return found
    raise AssertionError(f"{tries} connections reached only workers {sorted(found)}")


def worker_pids(master: int) -> Dict[int, int]:
    """Worker index -> pid, for the master's children now running (Linux /proc)."""
    children: List[int] = []
    for task in os.listdir(f"/proc/{master}/task"):
        with open(f"/proc/{master}/task/{task}/children") as f:
            children.extend(int(pid) for pid in f.read().split())
    found: Dict[int, int] = {}
    for pid in children:
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = dict(
                    entry.split(b"=", 1) for entry in f.read().split(b"\0") if b"=" in entry
                )
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue  # ended meanwhile
        if state != "Z" and b"HOOKAH_WORKER_INDEX" in environ:
            found[int(environ[b"HOOKAH_WORKER_INDEX"])] = pid
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class WorkersE2ETests(TestCase):
    async def server(self, *extra: str) -> HookahProcess:
        database = fresh_database(self)
        server = HookahProcess(self, temp_dir(self), [
            "--workers", "2", "--storage", database, "--allow-private-targets",
            "--claim-lease", str(LEASE), "--retry-schedule", "1,1,1,1,1,1,1,1,1,1", *extra,
        ])
        await server.started()

        async def both_workers() -> bool:
            return len(worker_pids(server.process.pid)) == 2

        await poll("both workers to run", both_workers, timeout=WAIT, interval=0.1)
        # Each worker has bound its site once it answers /healthz.
        connections = await deferToThread(connections_to_each_worker, server.url)
        for connection in connections.values():
            connection.close()
        return server

    def test_dispatches_are_delivered_once_and_metrics_count_the_whole_server(self) -> None:
        async def go() -> None:
            sink, target = listen_sink(self)
            server = await self.server()
            to = await deferToThread(connections_to_each_worker, server.url)
            count = 100

            def dispatch_all() -> List[str]:
                ids = []
                for n in range(count):
                    code, body = to[n % 2].request("POST", f"/dispatch?_url={quote(f'{target}/{n}', safe='')}", b"{}")
                    assert code == 202, (code, body)
                    ids.append(body["id"])
                return ids

            ids = await deferToThread(dispatch_all)
            self.assertEqual(len(set(ids)), count)
            await sink.wait_for(count, timeout=WAIT)
            arrived = Counter(r.path for r in sink.received)
            self.assertEqual(set(arrived), {f"/{n}" for n in range(count)})
            self.assertEqual(set(arrived.values()), {1})
            client = http_client(self)

            async def counted() -> bool:
                # Whichever worker answers, it counts every worker's attempts.
                response = await client.get(server.url + "/metrics")
                text = (await response.content()).decode()
                return sum(
                    float(line.split()[-1]) for line in text.splitlines()
                    if line.startswith('hookah_delivery_attempts_total{result="2xx"}')
                ) == count

            await poll("/metrics to count every delivery", counted, timeout=WAIT)
            for connection in to.values():
                connection.close()

        return ensureDeferred(go())

    def test_streams_on_both_workers_receive_an_event_accepted_by_one_and_the_status_page_counts_both(self) -> None:
        async def go() -> None:
            server = await self.server()
            first = await deferToThread(connections_to_each_worker, server.url)
            second = await deferToThread(connections_to_each_worker, server.url)
            topic = "https://example.test/workers"
            path = f"/stream?topic={quote(topic, safe='')}"

            def open_stream(connection: Connection) -> http.client.HTTPResponse:
                connection.http.request("GET", path)
                response = connection.http.getresponse()
                assert response.status == 200, response.status
                return response

            streams = await deferToThread(lambda: [open_stream(first[0]), open_stream(second[1])])
            client = http_client(self)

            async def both_counted() -> bool:
                # The status page adds up every worker's open streams.
                response = await client.get(server.url + "/")
                page = (await response.content()).decode()
                return '<div class="value">2</div><div class="label">stream readers</div>' in page

            await poll("the status page to count both streams", both_counted, timeout=WAIT, interval=0.2)
            code, body = await deferToThread(first[1].request, "POST", f"/dispatch?_topic={quote(topic, safe='')}", b'{"across": "workers"}')
            self.assertEqual(code, 202, body)

            def read_until_event(response: http.client.HTTPResponse) -> bytes:
                seen = b""
                while body["id"].encode() not in seen:
                    chunk = response.read1(65536)
                    if not chunk:
                        break
                    seen += chunk
                return seen

            for stream in streams:
                # Worker 1 accepted it: the stream on worker 0 and the one on worker 1 both get it.
                seen = await deferToThread(read_until_event, stream)
                self.assertIn(body["id"].encode(), seen)
                self.assertIn(b"across", seen)
            for connection in [*first.values(), *second.values()]:
                connection.close()

        return ensureDeferred(go())

    def test_a_killed_worker_loses_nothing_and_is_started_again(self) -> None:
        async def go() -> None:
            sink, target = listen_sink(self)
            sink.respond = lambda r: None  # the first attempts hang: the worker dies holding them
            server = await self.server()
            to = await deferToThread(connections_to_each_worker, server.url)
            held = 20

            def dispatch_to_worker_0() -> List[str]:
                ids = []
                for n in range(held):
                    code, body = to[0].request("POST", f"/dispatch?_url={quote(f'{target}/{n}', safe='')}", b"{}")
                    assert code == 202, (code, body)
                    ids.append(body["id"])
                return ids

            ids = await deferToThread(dispatch_to_worker_0)
            await sink.wait_for(held, timeout=WAIT)
            for connection in to.values():
                connection.close()
            victim = worker_pids(server.process.pid)[0]
            os.kill(victim, signal.SIGKILL)
            sink.respond = lambda r: (200, {}, b"ok")
            client = http_client(self)

            async def all_delivered() -> bool:
                response = await client.get(f"{server.url}/dispatch?status=delivered&limit=100")
                body = json.loads(await response.content())
                return {d["id"] for d in body["deliveries"]} == set(ids)

            await poll("the other worker to deliver the dead one's claims", all_delivered, timeout=WAIT, interval=0.2)
            self.assertEqual({r.path for r in sink.received[held:]}, {f"/{n}" for n in range(held)})

            async def restarted() -> Optional[int]:
                pid = worker_pids(server.process.pid).get(0)
                return pid if pid is not None and pid != victim else None

            await poll("the master to start worker 0 again", restarted, timeout=WAIT, interval=0.1)
            self.assertIn("hookah worker 0 ended", server.log())

        return ensureDeferred(go())

    def test_sigterm_to_the_master_stops_every_worker(self) -> None:
        async def go() -> None:
            server = await self.server()
            pids = list(worker_pids(server.process.pid).values())
            self.assertEqual(len(pids), 2)
            self.assertIn(await deferToThread(server.terminate), (0, -signal.SIGTERM))

            async def all_gone() -> bool:
                return not any(alive(pid) for pid in pids)

            await poll("the workers to end", all_gone, timeout=WAIT, interval=0.1)
            # Each worker stopped as a server does (attempts finished, storage closed).
            self.assertEqual(server.log().count("Server Shut Down."), 3)

        return ensureDeferred(go())
