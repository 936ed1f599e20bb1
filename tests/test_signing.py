"""
Standard Webhooks signatures from ``hookah.delivery.signing``, checked by the
independent ``standardwebhooks`` package (the reference implementation a
receiver would use), not by our own code.
"""

from __future__ import annotations

import base64
import time
from typing import Dict, List, Tuple

from hypothesis import given, settings
from hypothesis import strategies as st
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from twisted.trial.unittest import TestCase

from hookah.delivery.signing import Signer, secret_key, sign

WHSEC = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
WHSEC_OLD = "whsec_" + base64.b64encode(b"an older secret, being rotated!!").decode()
RAW = "a plain text secret, no prefix"

# Message ids as senders use them: printable, no "." ambiguity needed.
ids = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=40)
# The reference verifier decodes the body as UTF-8, so bodies are text.
bodies = st.text(max_size=500).map(lambda t: t.encode("utf-8"))


def as_dict(headers: List[Tuple[str, str]]) -> Dict[str, str]:
    names = [name for name, _ in headers]
    assert len(names) == len(set(names)), names
    return dict(headers)


def signed(secrets: List[str], msg_id: str, body: bytes) -> Dict[str, str]:
    # Receivers reject timestamps more than 5 minutes from their own clock:
    # sign at the real current time, as the dispatcher's reactor would.
    return as_dict(Signer(secrets).headers(msg_id, time.time(), body))


class SignerTests(TestCase):
    def test_headers(self) -> None:
        now = time.time()
        headers = as_dict(Signer([WHSEC]).headers("msg_1", now, b"{}"))
        self.assertEqual(set(headers), {"webhook-id", "webhook-timestamp", "webhook-signature"})
        self.assertEqual(headers["webhook-id"], "msg_1")
        self.assertEqual(headers["webhook-timestamp"], str(int(now)))
        self.assertTrue(headers["webhook-signature"].startswith("v1,"))

    def test_whsec_secret_verifies(self) -> None:
        body = b'{"type": "invoice.paid", "amount": 42}'
        headers = signed([WHSEC], "msg_2Lx", body)
        self.assertEqual(Webhook(WHSEC).verify(body, headers), {"type": "invoice.paid", "amount": 42})

    def test_raw_text_secret_verifies_with_its_bytes(self) -> None:
        body = b'{"ok": true}'
        headers = signed([RAW], "msg_raw", body)
        Webhook(RAW.encode("utf-8")).verify(body, headers)
        # And not as if it were base64 of something else.
        self.assertRaises(WebhookVerificationError, Webhook(WHSEC).verify, body, headers)

    def test_raw_secret_with_non_ascii_text(self) -> None:
        secret = "clé secrète ✓"
        headers = signed([secret], "msg_u", b"{}")
        Webhook(secret.encode("utf-8")).verify(b"{}", headers)

    def test_rotation_signs_with_every_secret(self) -> None:
        body = b'{"rotating": true}'
        headers = signed([WHSEC, WHSEC_OLD, RAW], "msg_rot", body)
        signatures = headers["webhook-signature"].split(" ")
        self.assertEqual(len(signatures), 3)
        self.assertTrue(all(s.startswith("v1,") for s in signatures))
        self.assertEqual(len(set(signatures)), 3)
        # Each secret alone verifies: a receiver that knows only one of them.
        Webhook(WHSEC).verify(body, headers)
        Webhook(WHSEC_OLD).verify(body, headers)
        Webhook(RAW.encode()).verify(body, headers)
        # A secret that is not among them does not.
        stranger = "whsec_" + base64.b64encode(b"someone else entirely").decode()
        self.assertRaises(WebhookVerificationError, Webhook(stranger).verify, body, headers)

    def test_tampered_body_is_rejected(self) -> None:
        body = b'{"amount": 100}'
        headers = signed([WHSEC], "msg_t", body)
        self.assertRaises(WebhookVerificationError, Webhook(WHSEC).verify, b'{"amount": 999}', headers)

    def test_tampered_id_or_timestamp_is_rejected(self) -> None:
        body = b"{}"
        headers = signed([WHSEC], "msg_a", body)
        self.assertRaises(WebhookVerificationError, Webhook(WHSEC).verify, body, dict(headers, **{"webhook-id": "msg_b"}))
        moved = str(int(headers["webhook-timestamp"]) - 1)
        self.assertRaises(
            WebhookVerificationError, Webhook(WHSEC).verify, body, dict(headers, **{"webhook-timestamp": moved})
        )

    def test_bad_whsec_secret_is_refused(self) -> None:
        self.assertRaises(ValueError, secret_key, "whsec_not base64!!")
        self.assertRaises(ValueError, Signer, ["whsec_%%%"])

    def test_whsec_key_is_the_decoded_base64(self) -> None:
        self.assertEqual(secret_key(WHSEC), b"0123456789abcdef0123456789abcdef")
        self.assertEqual(secret_key(RAW), RAW.encode())

    def test_timestamp_is_the_attempts(self) -> None:
        signer = Signer([WHSEC])
        first = as_dict(signer.headers("m", 1000.9, b"x"))
        later = as_dict(signer.headers("m", 90000.2, b"x"))
        self.assertEqual((first["webhook-timestamp"], later["webhook-timestamp"]), ("1000", "90000"))
        self.assertNotEqual(first["webhook-signature"], later["webhook-signature"])
        self.assertEqual(later["webhook-signature"], sign([secret_key(WHSEC)], "m", 90000, b"x"))


class SignatureProperties(TestCase):
    @settings(max_examples=150, deadline=None)
    @given(msg_id=ids, body=bodies)
    def test_reference_verifier_accepts_every_signature(self, msg_id: str, body: bytes) -> None:
        headers = signed([WHSEC, RAW], msg_id, body)
        self.assertIsNone(Webhook(WHSEC).verify(body, headers, json_parse=False))
        self.assertIsNone(Webhook(RAW.encode()).verify(body, headers, json_parse=False))

    @settings(max_examples=150, deadline=None)
    @given(msg_id=ids, body=bodies, other=bodies)
    def test_reference_verifier_rejects_another_body(self, msg_id: str, body: bytes, other: bytes) -> None:
        headers = signed([WHSEC], msg_id, body)
        if other != body:
            self.assertRaises(WebhookVerificationError, Webhook(WHSEC).verify, other, headers, json_parse=False)

    @settings(max_examples=100, deadline=None)
    @given(key=st.binary(min_size=1, max_size=64), msg_id=ids, body=bodies)
    def test_any_whsec_key(self, key: bytes, msg_id: str, body: bytes) -> None:
        secret = "whsec_" + base64.b64encode(key).decode()
        headers = signed([secret], msg_id, body)
        Webhook(secret).verify(body, headers, json_parse=False)
        Webhook(key).verify(body, headers, json_parse=False)
