"""
``/dispatch`` end to end over real sockets on 127.0.0.1: a running Hookah
(``start_hookah``), a local ``Sink`` as the target, and a treq client.
Every wait is bounded.
"""

from __future__ import annotations

import email.parser
import email.policy
import io
import json
import socket
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import parse_qsl, quote

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase
from twisted.web.test.requesthelper import DummyRequest

from hookah import __version__
from hookah.web.common import ApiError
from hookah.web.dispatch import CONTROLS, delivery_headers, parse_dispatch
from hookah.web.payload import Part, encode_form, encode_multipart, parse_form, parse_multipart
from tests.support import Received, http_client, listen_sink, start_hookah, temp_dir

JSON_BODY = b'{"z": 1,   "a": [1, 2.50, "\\u00e9"],\n "nested": {"k": null}}\n'


class DispatchHTTPTestCase(TestCase):
    async def start(self, **overrides: Any) -> Tuple[Any, str]:
        self.service, self.base = await start_hookah(self, **overrides)
        self.client = http_client(self)
        return self.service, self.base

    async def request(
        self, method: str, path: str, data: Optional[bytes] = None, headers: Optional[Dict[str, Any]] = None
    ) -> Tuple[int, Any, bytes]:
        response = await self.client.request(method, self.base + path, data=data, headers=headers or {})
        body = await response.content()
        return response.code, response.headers, body

    async def dispatch(self, query: str, data: bytes = b"{}", content_type: str = "application/json", **headers: str) -> Tuple[int, Any, Dict[str, Any]]:
        all_headers = {"Content-Type": content_type}
        all_headers.update({k.replace("_", "-"): v for k, v in headers.items()})
        code, response_headers, body = await self.request("POST", "/dispatch?" + query, data, all_headers)
        return code, response_headers, json.loads(body)

    async def delivery(self, delivery_id: str) -> Dict[str, Any]:
        code, _, body = await self.request("GET", f"/dispatch/{delivery_id}")
        self.assertEqual(code, 200, body)
        return json.loads(body)

    async def wait_for_status(self, delivery_id: str, status: str, timeout: float = 10.0) -> Dict[str, Any]:
        deadline = reactor.seconds() + timeout
        while True:
            delivery = await self.delivery(delivery_id)
            if delivery["status"] == status:
                return delivery
            if reactor.seconds() > deadline:
                self.fail(f"{delivery_id} is still {delivery['status']} after {timeout}s, not {status}")
            await deferLater(reactor, 0.02, lambda: None)

    def assertApiError(self, code: int, headers: Any, body: bytes, status: int, error: Optional[str] = None) -> Dict[str, Any]:
        self.assertEqual(code, status, body)
        self.assertEqual(headers.getRawHeaders("content-type"), ["application/json"])
        parsed = json.loads(body)
        self.assertEqual(set(parsed), {"error", "message"})
        self.assertTrue(parsed["message"])
        if error is not None:
            self.assertEqual(parsed["error"], error)
        return parsed


def q(url: str) -> str:
    return quote(url, safe="")


def raw_exchange(base: str, request: bytes) -> Tuple[int, Dict[str, str], bytes]:
    """
    One request written byte for byte on its own connection (HTTP clients
    refuse to send control characters in headers): status, headers, body.
    """
    host, port = base.split("//", 1)[1].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(request)
        data = b""
        while True:
            chunk = connection.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


class PayloadTests(DispatchHTTPTestCase):
    def test_json_forwarded_byte_for_byte(self) -> None:
        async def go() -> None:
            sink, sink_url = listen_sink(self)
            await self.start()
            code, headers, body = await self.dispatch(f"_url={q(sink_url + '/hook?x=1&y=2')}", JSON_BODY, "application/json; charset=utf-8")
            self.assertEqual(code, 202)
            self.assertEqual(set(body), {"id", "status"})
            self.assertEqual(body["status"], "scheduled")
            self.assertEqual(headers.getRawHeaders("location"), [f"/dispatch/{body['id']}"])
            [received] = await sink.wait_for(1)
            self.assertEqual(received.method, "POST")
            self.assertEqual(received.path, "/hook?x=1&y=2")
            self.assertEqual(received.body, JSON_BODY)
            self.assertEqual(received.headers["content-type"], ["application/json; charset=utf-8"])
            self.assertEqual(received.header("user-agent"), f"hookah/{__version__}")

        return ensureDeferred(go())

    def test_binary_forwarded_byte_for_byte(self) -> None:
        async def go() -> None:
            sink, sink_url = listen_sink(self)
            await self.start()
            payload = bytes(range(256)) * 4
            code, _, _ = await self.dispatch(f"_url={q(sink_url)}/bin", payload, "application/octet-stream")
            self.assertEqual(code, 202)
            [received] = await sink.wait_for(1)
            self.assertEqual((received.body, received.header("content-type")), (payload, "application/octet-stream"))

        return ensureDeferred(go())

    def test_form_minus_control_fields(self) -> None:
        async def go() -> None:
            sink, sink_url = listen_sink(self)
            await self.start()
            form = f"a=1&_url={q(sink_url + '/form')}&b=two+words&_retries=2&a=3&c=%C3%A9%26x".encode()
            code, _, body = await self.dispatch("", form, "application/x-www-form-urlencoded")
            self.assertEqual(code, 202, body)
            [received] = await sink.wait_for(1)
            self.assertEqual(received.path, "/form")
            self.assertEqual(received.header("content-type"), "application/x-www-form-urlencoded")
            self.assertEqual(parse_qsl(received.body.decode(), keep_blank_values=True), [("a", "1"), ("b", "two words"), ("a", "3"), ("c", "é&x")])
            delivery = await self.delivery(body["id"])
            self.assertEqual(delivery["retries"], 2)

        return ensureDeferred(go())

    def test_multipart_keeps_files(self) -> None:
        async def go() -> None:
            sink, sink_url = listen_sink(self)
            await self.start()
            pdf = b"%PDF-1.4\r\n\x00\xff binary\r\n--not-a-boundary\r\n"
            boundary = "XyZ-boundary-123"
            body = (
                f"--{boundary}\r\n"
                'Content-Disposition: form-data; name="_url"\r\n\r\n'
                f"{sink_url}/upload\r\n"
                f"--{boundary}\r\n"
                'Content-Disposition: form-data; name="title"\r\n\r\n'
                "Quarterly report\r\n"
                f"--{boundary}\r\n"
                'Content-Disposition: form-data; name="file"; filename="report 2024.pdf"\r\n'
                "Content-Type: application/pdf\r\n\r\n"
            ).encode() + pdf + f"\r\n--{boundary}\r\n".encode() + (
                'Content-Disposition: form-data; name="_timeout"\r\n\r\n'
                "5\r\n"
                f"--{boundary}--\r\n"
            ).encode()
            code, _, accepted = await self.dispatch("", body, f"multipart/form-data; boundary={boundary}")
            self.assertEqual(code, 202, accepted)
            [received] = await sink.wait_for(1)
            self.assertEqual(received.path, "/upload")
            content_type = received.header("content-type")
            self.assertTrue(content_type.startswith("multipart/form-data; boundary="), content_type)
            message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + received.body
            )
            parts = list(message.iter_parts())
            self.assertEqual([p.get_param("name", header="content-disposition") for p in parts], ["title", "file"])
            title, upload = parts
            self.assertEqual(title.get_payload(decode=True), b"Quarterly report")
            self.assertEqual(upload.get_filename(), "report 2024.pdf")
            self.assertEqual(upload.get_content_type(), "application/pdf")
            self.assertEqual(upload.get_payload(decode=True), pdf)
            self.assertEqual((await self.delivery(accepted["id"]))["timeout"], 5.0)

        return ensureDeferred(go())

    def test_extra_headers(self) -> None:
        async def go() -> None:
            sink, sink_url = listen_sink(self)
            await self.start()
            code, _, _ = await self.dispatch(
                f"_url={q(sink_url)}",
                b"{}",
                **{"X-Hookah-Header-X-Trace": "abc-123", "X-Hookah-Header-Authorization": "Bearer t0k"},
            )
            self.assertEqual(code, 202)
            [received] = await sink.wait_for(1)
            self.assertEqual(received.header("x-trace"), "abc-123")
            self.assertEqual(received.header("authorization"), "Bearer t0k")
            self.assertNotIn("x-hookah-header-x-trace", received.headers)
            self.assertEqual(received.header("user-agent"), f"hookah/{__version__}")

        return ensureDeferred(go())

    def test_connection_headers_cannot_be_set(self) -> None:
        async def go() -> None:
            await self.start()
            code, headers, body = await self.request(
                "POST", "/dispatch?_url=http://127.0.0.1:9/", b"{}", {"X-Hookah-Header-Content-Length": "5"}
            )
            self.assertApiError(code, headers, body, 400, "bad_header")

        return ensureDeferred(go())

    def test_headers_hookah_sets_cannot_be_forged(self) -> None:
        async def go() -> None:
            await self.start()
            for name in (
                "Content-Type", "content-type", "User-Agent", "webhook-id", "Webhook-Timestamp", "webhook-signature",
                "Link", "X-Hub-Signature", "X-Hookah-Delivery-Id", "x-hookah-anything", "Host", "Transfer-Encoding",
            ):
                code, headers, body = await self.request(
                    "POST", "/dispatch?_url=http://127.0.0.1:9/", b"{}", {f"X-Hookah-Header-{name}": "forged"}
                )
                self.assertApiError(code, headers, body, 400, "bad_header")
            # Control characters in a value (other than a tab) are refused too.
            for value in (b"a\x01b", b"a\x7fb", b"a\x1bb"):
                code, headers, body = await deferToThread(
                    raw_exchange,
                    self.base,
                    b"POST /dispatch?_url=http://127.0.0.1:9/ HTTP/1.0\r\nHost: x\r\n"
                    b"Content-Length: 0\r\nX-Hookah-Header-X-Trace: " + value + b"\r\n\r\n",
                )
                self.assertEqual((code, headers.get("content-type")), (400, "application/json"), (value, body))
                self.assertEqual(json.loads(body)["error"], "bad_header")
            counts = await self.service.store.count_deliveries()
            self.assertEqual(sum(counts.values()), 0)

        return ensureDeferred(go())

    def test_header_names_and_values_are_checked(self) -> None:
        # Twisted's own parser refuses most of these before Hookah sees them;
        # the check does not depend on it.
        class RawHeaders:
            def __init__(self, name: bytes, value: bytes) -> None:
                self.raw = [(b"X-Hookah-Header-" + name, [value])]

            def getAllRawHeaders(self) -> Any:
                return iter(self.raw)

        def request(name: bytes, value: bytes) -> Any:
            r: Any = DummyRequest([b""])
            r.requestHeaders = RawHeaders(name, value)
            return r

        for name, value in ((b"Bad Name", b"v"), (b"Bad(Name)", b"v"), (b"", b"v"), (b"A\xe9", b"v"), (b"X-Ok", b"a\x00b")):
            with self.assertRaises(ApiError) as caught:
                delivery_headers(request(name, value))
            self.assertEqual((caught.exception.status, caught.exception.error), (400, "bad_header"))
        # Tabs and non-ASCII (obs-text, e.g. UTF-8) values pass.
        self.assertEqual(
            delivery_headers(request(b"X-Trace", b"a\tb \xc3\xa9")), [("X-Trace", "a\tb \xc3\xa9")]
        )


class IgnoredControlTests(DispatchHTTPTestCase):
    """
    Every ``_`` field is a control field: an unknown one (Rails' ``_method``,
    a CSRF ``_token``, a typo) is stripped from what the target receives,
    named in the reply's ``ignored`` and in one log line, and never refused.
    """

    def capture_log(self) -> List[Dict[str, Any]]:
        events: List[Dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        return events

    def ignored_lines(self, events: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        return [e for e in events if e.get("log_namespace") == "hookah.web.dispatch" and "ignored" in e]

    def test_form_fields_are_stripped_listed_and_logged(self) -> None:
        async def go() -> None:
            sink, sink_url = listen_sink(self)
            await self.start()
            events = self.capture_log()
            form = (
                f"_url={q(sink_url + '/form')}&a=1&_method=put&_token=s3cr3t&_charset_=utf-8"
                "&b=2&_method=patch&_retry=3&%5Fcsrf=x&_bin=%FF%FE"
            ).encode()
            code, headers, body = await self.dispatch("_query_typo=1&_weird%FF=%FF", form, "application/x-www-form-urlencoded")
            self.assertEqual(code, 202, body)
            self.assertEqual(
                body,
                {
                    "id": body["id"],
                    "status": "scheduled",
                    "ignored": ["_query_typo", "_weird\\xff", "_method", "_token", "_retry", "_csrf", "_bin"],
                },
            )
            self.assertEqual(headers.getRawHeaders("location"), [f"/dispatch/{body['id']}"])
            [received] = await sink.wait_for(1)
            self.assertEqual((received.path, received.body), ("/form", b"a=1&b=2"))
            [line] = self.ignored_lines(events)
            self.assertEqual(line["id"], body["id"])
            self.assertEqual(line["ignored"], body["ignored"])
            text = formatEvent(line)
            self.assertIn(body["id"], text)
            self.assertIn("'_method'", text)
            # Names only: a CSRF token's value is never written to the log.
            self.assertNotIn("s3cr3t", text)
            self.assertNotIn("s3cr3t", repr(line))

        return ensureDeferred(go())

    def test_multipart_fields_are_stripped_and_listed(self) -> None:
        async def go() -> None:
            sink, sink_url = listen_sink(self)
            await self.start()
            boundary = "b0undary"
            body = (
                f"--{boundary}\r\n"
                'Content-Disposition: form-data; name="_url"\r\n\r\n'
                f"{sink_url}/upload\r\n"
                f"--{boundary}\r\n"
                'Content-Disposition: form-data; name="_csrf_token"\r\n\r\n'
            ).encode() + b"\xff\x00token\r\n" + (
                f"--{boundary}\r\n"
                'Content-Disposition: form-data; name="_charset_"\r\n\r\n'
                "UTF-8\r\n"
                f"--{boundary}\r\n"
                'Content-Disposition: form-data; name="title"\r\n\r\n'
                "Report\r\n"
                f"--{boundary}--\r\n"
            ).encode()
            code, _, accepted = await self.dispatch("_retries=1", body, f"multipart/form-data; boundary={boundary}")
            self.assertEqual(code, 202, accepted)
            self.assertEqual(accepted["ignored"], ["_csrf_token"])
            [received] = await sink.wait_for(1)
            content_type = received.header("content-type") or ""
            message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + received.body
            )
            parts = list(message.iter_parts())
            self.assertEqual([p.get_param("name", header="content-disposition") for p in parts], ["title"])
            self.assertEqual((await self.delivery(accepted["id"]))["retries"], 1)

        return ensureDeferred(go())

    def test_no_ignored_field_means_no_ignored_key(self) -> None:
        async def go() -> None:
            sink, sink_url = listen_sink(self)
            await self.start()
            events = self.capture_log()
            code, _, body = await self.dispatch("", f"_url={q(sink_url)}&_charset_=utf-8&a=1".encode(), "application/x-www-form-urlencoded")
            self.assertEqual(code, 202, body)
            self.assertEqual(set(body), {"id", "status"})
            [received] = await sink.wait_for(1)
            self.assertEqual(received.body, b"a=1")
            self.assertEqual(self.ignored_lines(events), [])

        return ensureDeferred(go())

    def test_topic_and_repeat_replies_list_their_own_ignored_fields(self) -> None:
        async def go() -> None:
            await self.start()
            form = b"_topic=orders&_method=put&n=1"
            code, _, first = await self.dispatch("_id=evt-9", form, "application/x-www-form-urlencoded")
            self.assertEqual(code, 202, first)
            self.assertEqual(first, {"id": first["id"], "status": "scheduled", "subscribers": 0, "ignored": ["_method"]})
            # A repeat names what it dropped itself, not what the first one did.
            code, _, again = await self.dispatch("_id=evt-9&_token=t", form, "application/x-www-form-urlencoded")
            self.assertEqual(code, 200, again)
            self.assertEqual(
                again,
                {"id": first["id"], "status": "scheduled", "subscribers": None, "duplicate": True, "ignored": ["_token", "_method"]},
            )
            code, _, plain = await self.dispatch("_id=evt-9", b"_topic=orders&n=1", "application/x-www-form-urlencoded")
            self.assertEqual((code, "ignored" in plain), (200, False))
            # The target of the event got the form without any _ field.
            code, _, page = await self.request("GET", "/topics/orders/events")
            [event] = json.loads(page)["events"]
            self.assertEqual(event["data"], "n=1")

        return ensureDeferred(go())

    def test_a_malformed_known_control_is_still_refused(self) -> None:
        async def go() -> None:
            await self.start()
            for form in (b"_url=http://127.0.0.1:9/&_method=put&_retries=abc", b"_url=http://127.0.0.1:9/&_token=x&_delay=-1"):
                code, headers, body = await self.request("POST", "/dispatch", form, {"Content-Type": "application/x-www-form-urlencoded"})
                self.assertApiError(code, headers, body, 400, "bad_parameter")
            counts = await self.service.store.count_deliveries()
            self.assertEqual(sum(counts.values()), 0)

        return ensureDeferred(go())

    def test_log_line_is_bounded(self) -> None:
        async def go() -> None:
            await self.start()
            events = self.capture_log()
            names = [f"_f{i}" for i in range(200)] + ["_" + "x" * 5000]
            form = ("_url=http://127.0.0.1:9/&_delay=3600&" + "&".join(f"{n}=1" for n in names)).encode()
            code, _, body = await self.dispatch("", form, "application/x-www-form-urlencoded")
            self.assertEqual(code, 202)
            self.assertEqual(body["ignored"], names)
            [line] = self.ignored_lines(events)
            self.assertEqual(line["count"], 201)
            self.assertLess(len(formatEvent(line)), 2000)

        return ensureDeferred(go())


# Form fields and query parameters of any bytes, named with a leading "_";
# Hookah's own names are left out, since their values must be well-formed.
unknown_controls = st.lists(
    st.tuples(
        st.binary(max_size=8).map(lambda b: b"_" + b).filter(lambda b: b.decode("utf-8", "replace") not in CONTROLS),
        st.binary(max_size=8),
    ),
    max_size=6,
)
payload_fields = st.lists(
    st.tuples(st.binary(max_size=8).filter(lambda b: not b.startswith(b"_")), st.binary(max_size=8)), max_size=4
)


def dummy_dispatch(query: List[Tuple[bytes, bytes]], body: bytes, content_type: str) -> Any:
    request: Any = DummyRequest([b""])
    request.method = b"POST"
    request.args = {}
    for name, value in query:
        request.args.setdefault(name, []).append(value)
    request.content = io.BytesIO(body)
    request.requestHeaders.setRawHeaders(b"content-type", [content_type.encode()])
    return request


@settings(max_examples=200, deadline=None)
@given(unknown_controls, unknown_controls, payload_fields, st.booleans())
def test_unknown_underscore_fields_never_reach_the_target_nor_refuse(
    query: List[Tuple[bytes, bytes]], fields: List[Tuple[bytes, bytes]], kept: List[Tuple[bytes, bytes]], multipart: bool
) -> None:
    mixed = fields + kept
    controls = [(b"_url", b"http://127.0.0.1:9/hook")]
    if multipart:
        parts = [Part(n.decode("utf-8", "replace"), v) for n, v in controls + mixed]
        body, content_type = encode_multipart(parts)
        # The names as the body spells them (CR and LF go out as %0D, %0A).
        sent_names = [p.name for p in parse_multipart(body, content_type)[1:] if p.name.startswith("_")]
    else:
        body, content_type = encode_form(controls + mixed), "application/x-www-form-urlencoded"
        sent_names = [n.decode("utf-8", "backslashreplace") for n, _ in fields]
    dispatch, ignored = parse_dispatch(dummy_dispatch(query, body, content_type))
    assert dispatch.url == "http://127.0.0.1:9/hook"
    if multipart:
        forwarded = [(p.name, p.data) for p in parse_multipart(dispatch.body, dispatch.content_type or "")]
        assert not any(name.startswith("_") for name, _ in forwarded)
    else:
        assert not any(name.startswith(b"_") for name, _ in parse_form(dispatch.body))
        assert parse_form(dispatch.body) == kept
    query_names = [n.decode("utf-8", "backslashreplace") for n in dict(query)]
    expected = [n for n in dict.fromkeys(query_names + sent_names) if n != "_charset_"]
    assert ignored == expected


class InspectionTests(DispatchHTTPTestCase):
    def test_get_delivery_shape(self) -> None:
        async def go() -> None:
            sink, sink_url = listen_sink(self)
            await self.start()
            _, _, accepted = await self.dispatch(f"_url={q(sink_url)}/x")
            delivered = await self.wait_for_status(accepted["id"], "delivered")
            self.assertTrue({"id", "url", "status", "attempts", "next_attempt_at"} <= set(delivered))
            self.assertEqual((delivered["id"], delivered["url"]), (accepted["id"], f"{sink_url}/x"))
            self.assertIsNone(delivered["next_attempt_at"])
            [attempt] = delivered["attempts"]
            self.assertEqual(set(attempt), {"at", "status_code", "error", "duration_ms"})
            self.assertEqual((attempt["status_code"], attempt["error"]), (200, None))
            self.assertIsInstance(attempt["duration_ms"], int)
            self.assertGreaterEqual(attempt["duration_ms"], 0)
            self.assertLessEqual(abs(attempt["at"] - reactor.seconds()), 60)

            before = reactor.seconds()
            _, _, later = await self.dispatch(f"_url={q(sink_url)}/later&_delay=600")
            scheduled = await self.delivery(later["id"])
            self.assertEqual((scheduled["status"], scheduled["attempts"]), ("scheduled", []))
            self.assertGreaterEqual(scheduled["next_attempt_at"], before + 600)
            self.assertLessEqual(scheduled["next_attempt_at"], reactor.seconds() + 600)

            code, headers, body = await self.request("GET", "/dispatch/01NOSUCHDELIVERY0000000000")
            self.assertApiError(code, headers, body, 404, "not_found")

        return ensureDeferred(go())

    def test_failed_attempt_is_recorded(self) -> None:
        async def go() -> None:
            sink, sink_url = listen_sink(self)
            sink.respond = lambda r: (410, {}, b"gone")
            await self.start()
            _, _, accepted = await self.dispatch(f"_url={q(sink_url)}/gone")
            failed = await self.wait_for_status(accepted["id"], "failed")
            self.assertEqual([(a["status_code"], a["error"]) for a in failed["attempts"]], [(410, "HTTP 410")])
            self.assertIsNone(failed["next_attempt_at"])

        return ensureDeferred(go())

    def test_list_failed_with_pagination(self) -> None:
        async def go() -> None:
            sink, sink_url = listen_sink(self)
            sink.respond = lambda r: (410, {}, b"") if r.path.startswith("/fail") else (200, {}, b"")
            await self.start()
            failed_ids: List[str] = []
            ok_ids: List[str] = []
            for i in range(5):
                _, _, accepted = await self.dispatch(f"_url={q(sink_url)}/fail{i}")
                failed_ids.append(accepted["id"])
                _, _, accepted = await self.dispatch(f"_url={q(sink_url)}/ok{i}")
                ok_ids.append(accepted["id"])
            for id in failed_ids:
                await self.wait_for_status(id, "failed")
            for id in ok_ids:
                await self.wait_for_status(id, "delivered")

            seen: List[str] = []
            after = ""
            pages = 0
            while True:
                code, _, body = await self.request("GET", f"/dispatch?status=failed&limit=2&after={after}")
                self.assertEqual(code, 200)
                page = json.loads(body)
                pages += 1
                self.assertLessEqual(len(page["deliveries"]), 2)
                self.assertEqual({d["status"] for d in page["deliveries"]} - {"failed"}, set())
                seen.extend(d["id"] for d in page["deliveries"])
                if page["next"] is None:
                    break
                self.assertEqual(page["next"], page["deliveries"][-1]["id"])
                after = page["next"]
                self.assertLess(pages, 10)
            self.assertEqual(seen, sorted(failed_ids))
            self.assertEqual(pages, 3)

            code, _, body = await self.request("GET", "/dispatch?limit=100")
            everything = json.loads(body)["deliveries"]
            self.assertEqual([d["id"] for d in everything], sorted(failed_ids + ok_ids))
            code, _, body = await self.request("GET", "/dispatch?status=delivered&limit=3")
            self.assertEqual([d["id"] for d in json.loads(body)["deliveries"]], sorted(ok_ids)[:3])

            for query in ("status=bogus", "limit=0", "limit=abc", "limit=100000"):
                code, headers, body = await self.request("GET", f"/dispatch?{query}")
                self.assertApiError(code, headers, body, 400)

        return ensureDeferred(go())

    def test_retry(self) -> None:
        async def go() -> None:
            sink, sink_url = listen_sink(self)
            sink.respond = lambda r: (410, {}, b"")
            await self.start()
            _, _, accepted = await self.dispatch(f"_url={q(sink_url)}/r")
            await self.wait_for_status(accepted["id"], "failed")

            sink.respond = lambda r: (200, {}, b"")
            code, headers, body = await self.request("POST", f"/dispatch/{accepted['id']}/retry")
            self.assertEqual(code, 202, body)
            self.assertEqual(json.loads(body), {"id": accepted["id"], "status": "scheduled"})
            self.assertEqual(headers.getRawHeaders("location"), [f"/dispatch/{accepted['id']}"])
            delivered = await self.wait_for_status(accepted["id"], "delivered")
            self.assertEqual([a["status_code"] for a in delivered["attempts"]], [410, 200])
            self.assertEqual(len(sink.received), 2)

            _, _, waiting = await self.dispatch(f"_url={q(sink_url)}/r&_delay=3600")
            code, headers, body = await self.request("POST", f"/dispatch/{waiting['id']}/retry")
            self.assertApiError(code, headers, body, 409)
            code, headers, body = await self.request("POST", "/dispatch/01NOSUCHDELIVERY0000000000/retry")
            self.assertApiError(code, headers, body, 404)

        return ensureDeferred(go())


class BadInputTests(DispatchHTTPTestCase):
    def test_400s(self) -> None:
        async def go() -> None:
            await self.start()
            ok = q("http://127.0.0.1:9/hook")
            cases = [
                ("", "missing_destination"),
                ("_retries=3", "missing_destination"),
                ("_url=", "missing_destination"),
                ("_url=ftp://example.com/x", "bad_url"),
                ("_url=file:///etc/passwd", "bad_url"),
                ("_url=javascript:alert(1)", "bad_url"),
                ("_url=/relative/path", "bad_url"),
                ("_url=http://", "bad_url"),
                ("_url=http://example.com:99999/", "bad_url"),
                (f"_url={ok}&_errback=gopher://x/", "bad_url"),
                (f"_url={ok}&_callback=nope", "bad_url"),
                (f"_url={ok}&_retries=abc", "bad_parameter"),
                (f"_url={ok}&_retries=-1", "bad_parameter"),
                (f"_url={ok}&_retries=1.5", "bad_parameter"),
                (f"_url={ok}&_retries=1000000", "bad_parameter"),
                (f"_url={ok}&_delay=abc", "bad_parameter"),
                (f"_url={ok}&_delay=-5", "bad_parameter"),
                (f"_url={ok}&_delay=nan", "bad_parameter"),
                (f"_url={ok}&_delay=inf", "bad_parameter"),
                (f"_url={ok}&_timeout=0", "bad_parameter"),
                (f"_url={ok}&_timeout=abc", "bad_parameter"),
                (f"_url={ok}&_timeout=-1", "bad_parameter"),
                (f"_url={ok}&_timeout=nan", "bad_parameter"),
                # Spellings float() and str.isdigit() accept but no decimal number has.
                (f"_url={ok}&_retries=%C2%B2", "bad_parameter"),
                (f"_url={ok}&_retries=%D9%A3", "bad_parameter"),
                (f"_url={ok}&_retries={'1' * 5000}", "bad_parameter"),
                (f"_url={ok}&_delay=1_0", "bad_parameter"),
                (f"_url={ok}&_delay=Infinity", "bad_parameter"),
                (f"_url={ok}&_delay=1e3", "bad_parameter"),
                (f"_url={ok}&_delay=%2B5", "bad_parameter"),
                (f"_url={ok}&_delay=%205", "bad_parameter"),
                (f"_url={ok}&_delay=%D9%A3", "bad_parameter"),
                (f"_url={ok}&_timeout=1_0", "bad_parameter"),
                (f"_url={ok}&_timeout=inf", "bad_parameter"),
                (f"_url={ok}&_timeout=0.05", "bad_parameter"),
                (f"_url={ok}&_timeout=0.0001", "bad_parameter"),
                (f"_url={ok}&_timeout=3601", "bad_parameter"),
                # URLs urlsplit cannot parse.
                ("_url=http://[zz/", "bad_url"),
                ("_url=http://[::1/", "bad_url"),
                (f"_url={q('http://[zz]/hook')}", "bad_url"),
                (f"_url={q('https://a]/')}", "bad_url"),
                (f"_url={ok}&_errback={q('http://[zz/')}", "bad_url"),
                (f"_url={ok}&_callback={q('http://[::1/')}", "bad_url"),
                # A known control must be UTF-8 text; an unknown one is merely dropped.
                (f"_url={ok}&_retries=%FF", "bad_parameter"),
                (f"_url={ok}&_bogus=%FF&_id=%FF", "bad_parameter"),
                # Unknown fields do not make up for a missing destination.
                ("_URL=x&_bogus=1", "missing_destination"),
                (f"_url={ok}&_topic=news", "bad_parameter"),
                (f"_url={ok}&_url={q('http://127.0.0.1:10/')}", "bad_parameter"),
            ]
            for query, error in cases:
                code, headers, body = await self.request("POST", f"/dispatch?{query}", b"{}", {"Content-Type": "application/json"})
                parsed = self.assertApiError(code, headers, body, 400)
                self.assertEqual(parsed["error"], error, query)
            # In a form body too.
            code, headers, body = await self.request(
                "POST", "/dispatch", f"_url={ok}&_retries=x".encode(), {"Content-Type": "application/x-www-form-urlencoded"}
            )
            self.assertApiError(code, headers, body, 400, "bad_parameter")
            code, headers, body = await self.request(
                "POST", "/dispatch", b"--b\r\nbroken", {"Content-Type": "multipart/form-data; boundary=b"}
            )
            self.assertApiError(code, headers, body, 400)
            counts = await self.service.store.count_deliveries()
            self.assertEqual(sum(counts.values()), 0)

        return ensureDeferred(go())

    def test_plain_decimals_are_accepted(self) -> None:
        async def go() -> None:
            await self.start()
            ok = q("http://127.0.0.1:9/hook")
            for query, delay, timeout, retries in (
                ("_delay=0060.25&_timeout=0.1", 60.25, 0.1, None),
                ("_delay=60.&_timeout=.5", 60.0, 0.5, None),
                ("_delay=3600&_timeout=3600&_retries=0", 3600.0, 3600.0, 0),
                ("_delay=100&_retries=007&_timeout=2.50", 100.0, 2.5, 7),
            ):
                code, _, accepted = await self.dispatch(f"_url={ok}&{query}")
                self.assertEqual(code, 202, (query, accepted))
                delivery = await self.delivery(accepted["id"])
                self.assertEqual((delivery["timeout"], delivery["retries"]), (timeout, retries), query)
                self.assertAlmostEqual(delivery["next_attempt_at"] - delivery["created_at"], delay, places=3)

        return ensureDeferred(go())

    def test_413_above_max_body(self) -> None:
        async def go() -> None:
            sink, sink_url = listen_sink(self)
            await self.start(max_body=1000)
            code, headers, body = await self.request(
                "POST", f"/dispatch?_url={q(sink_url)}", b"x" * 1001, {"Content-Type": "application/octet-stream"}
            )
            self.assertApiError(code, headers, body, 413, "body_too_large")
            code, headers, body = await self.request(
                "POST", f"/dispatch?_url={q(sink_url)}", b"y" * 1000, {"Content-Type": "application/octet-stream"}
            )
            self.assertEqual(code, 202, body)
            [received] = await sink.wait_for(1)
            self.assertEqual(received.body, b"y" * 1000)
            # The service still answers after refusing a body.
            code, headers, body = await self.request(
                "POST", f"/dispatch?_url={q(sink_url)}", b"z" * 50000, {"Content-Type": "application/octet-stream"}
            )
            self.assertEqual(code, 413)
            counts = await self.service.store.count_deliveries()
            self.assertEqual(sum(counts.values()), 1)

        return ensureDeferred(go())

    def test_no_100_continue_for_a_body_that_is_too_large(self) -> None:
        async def go() -> None:
            await self.start(max_body=1000)
            port = int(self.base.rsplit(":", 1)[1])

            def ask() -> bytes:
                with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                    s.sendall(
                        b"POST /dispatch?_url=http%3A%2F%2F127.0.0.1%3A9%2F HTTP/1.1\r\nHost: x\r\n"
                        b"Content-Type: application/octet-stream\r\nContent-Length: 5000\r\n"
                        b"Expect: 100-continue\r\n\r\n"
                    )
                    s.settimeout(0.5)
                    try:
                        early = s.recv(4096)  # a "100 Continue" would come now
                    except socket.timeout:
                        early = b""
                    # The client goes ahead without a 100, as clients do after a wait.
                    s.settimeout(10)
                    s.sendall(b"x" * 5000)
                    return early + s.recv(4096)

            answer = await deferToThread(ask)
            self.assertTrue(answer.startswith(b"HTTP/1.1 413 "), answer[:100])
            self.assertNotIn(b"100 Continue", answer)

        return ensureDeferred(go())

    def test_underscore_and_ipv6_hosts_are_accepted(self) -> None:
        async def go() -> None:
            await self.start()
            for url in ("http://my_service.example/hook", "http://[::1]:9/hook"):
                code, headers, body = await self.request("POST", f"/dispatch?_url={q(url)}", b"{}")
                self.assertEqual(code, 202, body)

        return ensureDeferred(go())

    def test_unencodable_host_is_refused_at_submission(self) -> None:
        async def go() -> None:
            await self.start()
            for query in (
                f"_url={q('http://☃️.example/hook')}",
                f"_url={q('http://a b.example/hook')}",
                f"_url=http://127.0.0.1:9/&_errback={q('http://☃️.example/')}",
            ):
                code, headers, body = await self.request("POST", f"/dispatch?{query}", b"{}")
                parsed = self.assertApiError(code, headers, body, 400, "bad_url")
                self.assertIn("cannot be sent", parsed["message"])
            counts = await self.service.store.count_deliveries()
            self.assertEqual(sum(counts.values()), 0)

        return ensureDeferred(go())


class IdempotencyTests(DispatchHTTPTestCase):
    def test_idempotency_key_header(self) -> None:
        async def go() -> None:
            sink, sink_url = listen_sink(self)
            await self.start()
            code, headers, first = await self.dispatch(f"_url={q(sink_url)}/once", b'{"n":1}', Idempotency_Key="order-42")
            self.assertEqual(code, 202)
            await sink.wait_for(1)
            code, headers, second = await self.dispatch(f"_url={q(sink_url)}/once", b'{"n":1}', Idempotency_Key="order-42")
            self.assertEqual(code, 200)
            self.assertEqual(second["id"], first["id"])
            self.assertEqual(headers.getRawHeaders("location"), [f"/dispatch/{first['id']}"])
            # A different key is a different delivery.
            code, _, third = await self.dispatch(f"_url={q(sink_url)}/once", b'{"n":1}', Idempotency_Key="order-43")
            self.assertEqual(code, 202)
            self.assertNotEqual(third["id"], first["id"])
            await sink.wait_for(2)
            await self.wait_for_status(third["id"], "delivered")
            self.assertEqual(len(sink.received), 2)
            counts = await self.service.store.count_deliveries()
            self.assertEqual(sum(counts.values()), 2)

        return ensureDeferred(go())

    def test_id_parameter(self) -> None:
        async def go() -> None:
            sink, sink_url = listen_sink(self)
            await self.start()
            code, _, first = await self.dispatch(f"_url={q(sink_url)}&_id=evt_1")
            self.assertEqual(code, 202)
            code, _, again = await self.dispatch(f"_url={q(sink_url)}&_id=evt_1")
            self.assertEqual((code, again["id"]), (200, first["id"]))
            # The same key as a form field.
            form = f"_url={q(sink_url)}&_id=evt_1&a=1".encode()
            code, _, body = await self.request("POST", "/dispatch", form, {"Content-Type": "application/x-www-form-urlencoded"})
            self.assertEqual((code, json.loads(body)["id"]), (200, first["id"]))
            await self.wait_for_status(first["id"], "delivered")
            self.assertEqual(len(sink.received), 1)

        return ensureDeferred(go())

    def test_duplicate_topic_event_keeps_the_reply_shape(self) -> None:
        async def go() -> None:
            await self.start()
            code, _, first = await self.dispatch("_topic=orders", b'{"n":1}', Idempotency_Key="evt-1")
            self.assertEqual(code, 202)
            self.assertEqual(first, {"id": first["id"], "status": "scheduled", "subscribers": 0})
            for _attempt in range(2):
                code, headers, again = await self.dispatch("_topic=orders", b'{"n":1}', Idempotency_Key="evt-1")
                self.assertEqual(code, 200)
                self.assertEqual(
                    again, {"id": first["id"], "status": "scheduled", "subscribers": None, "duplicate": True}
                )
                self.assertEqual(headers.getRawHeaders("location"), ["/topics/orders/events"])
            # Concurrent repeats of a new key: the waiters answer the same shape.
            results = await gatherResults(
                [ensureDeferred(self.dispatch("_topic=orders&_id=evt-2", b"{}")) for _ in range(3)]
            )
            bodies = sorted((body for _, _, body in results), key=lambda b: "duplicate" in b)
            self.assertEqual(bodies[0]["subscribers"], 0)
            for body in bodies[1:]:
                self.assertEqual((body["subscribers"], body["duplicate"]), (None, True))
            # A duplicate URL dispatch has no subscribers field at all.
            _, _, url_first = await self.dispatch("_url=http://127.0.0.1:9/&_delay=3600", Idempotency_Key="url-1")
            code, _, url_again = await self.dispatch("_url=http://127.0.0.1:9/&_delay=3600", Idempotency_Key="url-1")
            self.assertEqual((code, url_again), (200, {"id": url_first["id"], "status": "scheduled", "duplicate": True}))

        return ensureDeferred(go())

    def test_concurrent_repeats_queue_once(self) -> None:
        async def go() -> None:
            sink, sink_url = listen_sink(self)
            directory = temp_dir(self)
            await self.start(storage=f"sqlite:{directory}/h.db")
            results = await gatherResults(
                [ensureDeferred(self.dispatch(f"_url={q(sink_url)}", Idempotency_Key="same")) for _ in range(5)]
            )
            codes = sorted(code for code, _, _ in results)
            self.assertEqual(codes, [200, 200, 200, 200, 202])
            self.assertEqual(len({body["id"] for _, _, body in results}), 1)
            await self.wait_for_status(results[0][2]["id"], "delivered")
            self.assertEqual(len(sink.received), 1)

        return ensureDeferred(go())

    def test_idempotency_survives_a_restart(self) -> None:
        async def go() -> None:
            directory = temp_dir(self)
            storage = f"sqlite:{directory}/h.db"
            first_service, _ = await self.start(storage=storage)
            code, _, first = await self.dispatch("_url=http://127.0.0.1:9/later&_delay=3600", Idempotency_Key="restart-key")
            self.assertEqual(code, 202)
            await first_service.stopService()

            await self.start(storage=storage)
            code, headers, again = await self.dispatch("_url=http://127.0.0.1:9/later&_delay=3600", Idempotency_Key="restart-key")
            self.assertEqual(code, 200)
            self.assertEqual(again["id"], first["id"])
            # The delivery itself survived, still waiting for its time.
            delivery = await self.delivery(first["id"])
            self.assertEqual(delivery["status"], "scheduled")
            counts = await self.service.store.count_deliveries()
            self.assertEqual(sum(counts.values()), 1)

        return ensureDeferred(go())


class MethodTests(DispatchHTTPTestCase):
    """Every resource answers an unsupported method with a JSON 405 and Allow, an unknown path with a JSON 404."""

    ALLOWED = {
        "/dispatch": "GET, HEAD, POST",
        "/dispatch/": "GET, HEAD, POST",
        "/dispatch/{id}": "GET, HEAD",
        "/dispatch/{id}/retry": "POST",
        "/topics": "GET, HEAD",
        "/topics/t/events": "GET, HEAD",
        "/hub": "POST",
        "/subscribe": "POST",
        "/publish": "POST",
        "/hub/subscriptions": "GET, HEAD",
        "/": "GET, HEAD",
        "/healthz": "GET, HEAD",
        "/metrics": "GET, HEAD",
        "/stream?topic=t": "GET, HEAD",
        "/login": "GET, HEAD, POST",
        "/logout": "POST",
    }
    METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")

    async def delivery_id(self) -> str:
        _, _, accepted = await self.dispatch("_url=http://127.0.0.1:9/&_delay=3600")
        return str(accepted["id"])

    def test_unsupported_methods_get_json_405_with_allow(self) -> None:
        async def go() -> None:
            await self.start()
            delivery = await self.delivery_id()
            for template, allow in self.ALLOWED.items():
                path = template.format(id=delivery)
                allowed = allow.split(", ")
                for method in self.METHODS:
                    if method in allowed:
                        continue
                    code, headers, body = await self.request(method, path)
                    where = f"{method} {path}"
                    self.assertEqual(code, 405, f"{where}: {body!r}")
                    self.assertEqual(headers.getRawHeaders("allow"), [allow], where)
                    self.assertEqual(headers.getRawHeaders("content-type"), ["application/json"], where)
                    if method != "HEAD":
                        parsed = json.loads(body)
                        self.assertEqual(set(parsed), {"error", "message"}, where)
                        self.assertEqual(parsed["error"], "method_not_allowed", where)
                        self.assertTrue(parsed["message"], where)

        return ensureDeferred(go())

    def test_head_works_where_get_does(self) -> None:
        async def go() -> None:
            await self.start()
            delivery = await self.delivery_id()
            for template, allow in self.ALLOWED.items():
                if "HEAD" not in allow or template == "/login":  # /login redirects without admin tokens
                    continue
                path = template.format(id=delivery)
                code, _, body = await self.request("HEAD", path)
                self.assertEqual(code, 200, f"HEAD {path}")
                self.assertEqual(body, b"", f"HEAD {path}")
                get_code, _, _ = await self.request("GET", path) if "stream" not in path else (code, None, b"")
                self.assertEqual(code, get_code, f"HEAD and GET {path}")

        return ensureDeferred(go())

    def test_unknown_paths_get_json_404(self) -> None:
        async def go() -> None:
            await self.start()
            delivery = await self.delivery_id()
            paths = [
                "/nope", "/nope/deeper", "/favicon.ico", "/hub/zzz", "/hub/subscriptions/x", "/subscribe/x",
                f"/dispatch/{delivery}/nope", f"/dispatch/{delivery}/retry/x", "/topics/t", "/topics/t/events/x/y",
                "/healthz/x", "/metrics/x", "/stream/x?topic=t", "/login/x", "/logout/x",
            ]
            for path in paths:
                for method in ("GET", "POST", "PUT", "DELETE"):
                    code, headers, body = await self.request(method, path)
                    parsed = self.assertApiError(code, headers, body, 404, "not_found")
                    self.assertTrue(parsed["message"], f"{method} {path}")

        return ensureDeferred(go())

    def test_admin_tokens_do_not_change_the_answers(self) -> None:
        async def go() -> None:
            await self.start(admin_tokens=("adm",), publisher_tokens=("pub",))
            auth = {"Authorization": "Bearer adm"}
            for method, path, status in (
                ("PUT", "/dispatch", 405), ("DELETE", "/topics", 405), ("PATCH", "/hub", 405),
                ("OPTIONS", "/metrics", 405), ("PUT", "/", 405), ("GET", "/hub/zzz", 404), ("GET", "/nope", 404),
            ):
                code, headers, body = await self.request(method, path, headers=auth)
                self.assertApiError(code, headers, body, status)

        return ensureDeferred(go())


class ReportTests(DispatchHTTPTestCase):
    def test_errback_after_exhaustion(self) -> None:
        async def go() -> None:
            sink, sink_url = listen_sink(self)
            sink.respond = lambda r: (200, {}, b"") if r.path == "/errback" else (500, {}, b"down")
            await self.start(retry_schedule=(0.1,))
            _, _, accepted = await self.dispatch(f"_url={q(sink_url)}/hook&_retries=1&_errback={q(sink_url + '/errback')}")
            received = await sink.wait_for(3)
            self.assertEqual([r.path for r in received], ["/hook", "/hook", "/errback"])
            errback: Received = received[2]
            self.assertEqual(errback.header("content-type"), "application/json")
            self.assertEqual(errback.header("x-hookah-delivery-id"), accepted["id"])
            report = json.loads(errback.body)
            self.assertEqual(report["id"], accepted["id"])
            self.assertEqual(report["url"], f"{sink_url}/hook")
            self.assertEqual([(a["status_code"], a["error"]) for a in report["attempts"]], [(500, "HTTP 500")] * 2)
            for attempt in report["attempts"]:
                self.assertEqual(set(attempt), {"at", "status_code", "error", "duration_ms"})
            failed = await self.delivery(accepted["id"])
            self.assertEqual(failed["status"], "failed")

        return ensureDeferred(go())

    def test_callback_after_success(self) -> None:
        async def go() -> None:
            sink, sink_url = listen_sink(self)
            sink.respond = lambda r: (200, {}, b"") if r.path == "/cb" else (201, {"Content-Type": "text/csv", "X-Answer": "42"}, b"a,b\n1,2\n")
            await self.start()
            _, _, accepted = await self.dispatch(f"_url={q(sink_url)}/hook&_callback={q(sink_url + '/cb')}")
            received = await sink.wait_for(2)
            self.assertEqual([r.path for r in received], ["/hook", "/cb"])
            callback = received[1]
            self.assertEqual(callback.header("x-hookah-delivery-id"), accepted["id"])
            self.assertEqual(callback.header("content-type"), "application/json")
            report = json.loads(callback.body)
            self.assertEqual(report["id"], accepted["id"])
            self.assertEqual(report["status_code"], 201)
            self.assertEqual(report["content_type"], "text/csv")
            self.assertEqual(report["body"], "a,b\n1,2\n")
            self.assertIn(["X-Answer", "42"], report["headers"])
            delivered = await self.wait_for_status(accepted["id"], "delivered")
            self.assertEqual(delivered["attempts"][0]["status_code"], 201)

        return ensureDeferred(go())

    def test_signed_when_a_secret_is_configured(self) -> None:
        async def go() -> None:
            from standardwebhooks.webhooks import Webhook

            secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
            sink, sink_url = listen_sink(self)
            await self.start(signing_secrets=(secret,))
            _, _, accepted = await self.dispatch(f"_url={q(sink_url)}", JSON_BODY)
            [received] = await sink.wait_for(1)
            headers = {k: received.header(k) for k in ("webhook-id", "webhook-timestamp", "webhook-signature")}
            self.assertEqual(headers["webhook-id"], accepted["id"])
            Webhook(secret).verify(received.body, headers)

        return ensureDeferred(go())


class TopicNameTests(DispatchHTTPTestCase):
    def test_escaped_and_plain_unreserved_characters_name_one_topic(self) -> None:
        # The hub stores http://feeds.example/a~b for a subscription to
        # .../a%7Eb (WebSub 5.1.1); /dispatch?_topic= must reach it either way.
        async def go() -> None:
            from hookah.model import Subscription

            service, _ = await self.start()
            await service.store.put_subscription(
                Subscription(topic="http://feeds.example/a~b", callback="http://127.0.0.1:9/cb", expires_at=4e9)
            )
            for spelling in ("http://feeds.example/a~b", "http://feeds.example/a%7Eb", "http://feeds.example/a%7eb"):
                code, _, body = await self.request("POST", f"/dispatch?_topic={q(spelling)}", b"{}")
                self.assertEqual(code, 202, body)
                self.assertEqual(json.loads(body)["subscribers"], 1, spelling)
            code, _, body = await self.request("POST", f"/dispatch?_topic={q('http://feeds.example/a%2Fb')}", b"{}")
            self.assertEqual(json.loads(body)["subscribers"], 0)

        return ensureDeferred(go())
