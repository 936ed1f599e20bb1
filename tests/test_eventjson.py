"""``event_to_json``: the event shape shared by /topics/<T>/events and /stream."""

from __future__ import annotations

import base64
import json

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from hookah.streams.eventjson import event_to_json, is_json_type
from hookah.model import Event


def event(body: bytes, content_type: str | None) -> Event:
    return Event("01ID", "https://t.example/feed", body, content_type, created_at=1700000000.5)


class EventJsonTests(SynchronousTestCase):
    def test_json_payload_is_embedded_as_a_value(self) -> None:
        self.assertEqual(
            event_to_json(event(b'{"a": [1, 2.5, null]}', "application/json; charset=utf-8")),
            {
                "id": "01ID",
                "topic": "https://t.example/feed",
                "time": 1700000000.5,
                "content_type": "application/json; charset=utf-8",
                "data": {"a": [1, 2.5, None]},
            },
        )
        self.assertEqual(event_to_json(event(b"[true]", "application/activity+json"))["data"], [True])

    def test_invalid_json_falls_back_to_text(self) -> None:
        for body in (b"{not json", b"NaN", b'{"x": Infinity}', b""):
            obj = event_to_json(event(body, "application/json"))
            self.assertEqual(obj["data"], body.decode())
            self.assertNotIn("encoding", obj)
            json.loads(json.dumps(obj, allow_nan=False))

    def test_text_is_a_string(self) -> None:
        obj = event_to_json(event("héllo\n".encode(), "text/plain"))
        self.assertEqual(obj["data"], "héllo\n")
        self.assertNotIn("encoding", obj)
        self.assertEqual(event_to_json(event(b'{"a":1}', None))["data"], '{"a":1}', "not declared JSON: text")

    def test_binary_is_base64(self) -> None:
        obj = event_to_json(event(b"\xff\x00\xfe", "application/octet-stream"))
        self.assertEqual(obj["encoding"], "base64")
        self.assertEqual(base64.b64decode(obj["data"]), b"\xff\x00\xfe")

    def test_is_json_type(self) -> None:
        self.assertTrue(is_json_type("Application/JSON ; charset=utf-8"))
        self.assertTrue(is_json_type("application/feed+json"))
        self.assertFalse(is_json_type("text/json-ish"))
        self.assertFalse(is_json_type(None))

    @given(st.binary(max_size=200), st.sampled_from([None, "text/plain", "application/json", "image/png"]))
    def test_any_body_round_trips(self, body: bytes, content_type: str | None) -> None:
        obj = json.loads(json.dumps(event_to_json(event(body, content_type)), allow_nan=False))
        if obj.get("encoding") == "base64":
            self.assertEqual(base64.b64decode(obj["data"]), body)
        elif is_json_type(content_type) and obj["data"] != body.decode("utf-8", "replace"):
            self.assertEqual(obj["data"], json.loads(body))
        else:
            self.assertEqual(obj["data"].encode("utf-8"), body)
