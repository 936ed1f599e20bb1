"""
Tests for hookah.web.payload: what a /dispatch body forwards, and what it controls.

The properties pin the promises the web layer relies on (forms lose exactly
their ``_`` fields, multipart keeps files byte for byte, anything else is not
touched); the hand-written bodies, one captured from a real ``curl -F``, keep
the parser honest about what clients actually send.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hookah.web import payload as payload_module
from hookah.web.payload import (
    Part,
    Payload,
    PayloadError,
    encode_form,
    encode_multipart,
    parse_form,
    parse_multipart,
    parse_query,
    split_payload,
)

FORM = "application/x-www-form-urlencoded"

# -- strategies ---------------------------------------------------------------

# Characters that mean something in a form body come up often on purpose.
form_text = st.text(
    alphabet=st.one_of(st.sampled_from("&=+%_ ;#?\r\n"), st.characters(codec="utf-8")),
    max_size=12,
)
form_pairs = st.lists(st.tuples(form_text, form_text), max_size=8)
form_pairs_with_controls = st.lists(
    st.tuples(st.one_of(form_text, form_text.map(lambda s: "_" + s)), form_text),
    max_size=8,
)
byte_pairs = st.lists(st.tuples(st.binary(max_size=10), st.binary(max_size=10)), max_size=8)
# Form fields of any bytes, about half of them named like controls (``_``
# then anything, non-UTF-8 included). ``urlencode`` leaves "_" as it is; the
# escaped spelling %5F is tested apart (test_form_escaped_underscore_...).
underscore_pair = st.tuples(st.binary(max_size=10).map(lambda b: b"_" + b), st.binary(max_size=10))
payload_pair = st.tuples(st.binary(max_size=10).filter(lambda b: not b.startswith(b"_")), st.binary(max_size=10))
mixed_byte_pairs = st.lists(st.one_of(underscore_pair, payload_pair), max_size=10)

# Names and filenames: anything but raw CR/LF (those are escaped on the way
# out, see test_encode_multipart_escapes_names), with quoting hazards favoured.
header_text = st.text(
    alphabet=st.one_of(
        st.sampled_from('"\\;=% \t\'*'), st.characters(codec="utf-8", exclude_characters="\r\n")
    ),
    max_size=12,
)
# Header values lose surrounding blanks when parsed, like any HTTP header.
header_value = header_text.map(lambda s: s.strip(" \t"))
header_name = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.!#$%&'*+^`|~",
    min_size=1,
    max_size=10,
).map(lambda s: "X-" + s)
# Binary data, often built from fragments that look like delimiters.
part_data = st.one_of(
    st.binary(max_size=40),
    st.lists(
        st.one_of(
            st.binary(max_size=8),
            st.sampled_from(
                [b"\r\n", b"--", b"\r\n--", b"\r\n\r\n", b"--hookah-", b"\r\n--hookah-", b"\x00\xff"]
            ),
        ),
        max_size=10,
    ).map(b"".join),
)
parts = st.builds(
    Part,
    name=header_text,
    data=part_data,
    filename=st.none() | header_text,
    content_type=st.none() | header_value | st.sampled_from(["text/plain; charset=utf-8", "image/png"]),
    headers=st.lists(st.tuples(header_name, header_value), max_size=2).map(tuple),
)
# A control field's value may be any bytes: an unknown one (a CSRF token, a
# binary field) is dropped, never a reason to refuse the body.
control_parts = st.builds(
    Part,
    name=header_text.map(lambda s: "_" + s),
    data=part_data,
)
underscore_files = st.builds(
    Part,
    name=header_text.map(lambda s: "_" + s),
    data=part_data,
    filename=header_text,
)
payload_parts = parts.filter(lambda p: p.filename is not None or not p.name.startswith("_"))

raw_types = st.sampled_from(
    [
        None,
        "application/json",
        "application/xml",
        "text/xml; charset=utf-8",
        "application/octet-stream",
        "text/plain",
        "multipart/mixed; boundary=x",
    ]
)


def is_control(part: Part) -> bool:
    return part.filename is None and part.name.startswith("_")


def utf8(pairs: List[Tuple[str, str]]) -> List[Tuple[bytes, bytes]]:
    return [(n.encode("utf-8"), v.encode("utf-8")) for n, v in pairs]


# -- application/x-www-form-urlencoded ----------------------------------------


@given(form_pairs)
def test_form_round_trips_text(pairs: List[Tuple[str, str]]) -> None:
    assert parse_form(encode_form(utf8(pairs))) == utf8(pairs)


@given(byte_pairs)
def test_form_round_trips_any_bytes(pairs: List[Tuple[bytes, bytes]]) -> None:
    encoded = encode_form(pairs)
    assert encoded.isascii()
    assert parse_form(encoded) == pairs


@given(form_pairs)
def test_query_round_trips_text(pairs: List[Tuple[str, str]]) -> None:
    assert parse_query(encode_form(utf8(pairs))) == pairs


@given(form_pairs_with_controls, st.sampled_from([FORM, "Application/X-WWW-Form-URLEncoded; charset=UTF-8"]))
def test_form_split_removes_exactly_the_controls(pairs: List[Tuple[str, str]], content_type: str) -> None:
    result = split_payload(encode_form(utf8(pairs)), content_type)
    assert result.controls == [(n, v.encode("utf-8")) for n, v in pairs if n.startswith("_")]
    assert parse_form(result.body) == utf8([(n, v) for n, v in pairs if not n.startswith("_")])
    assert result.content_type == content_type


@given(mixed_byte_pairs)
def test_no_underscore_form_field_reaches_the_target(pairs: List[Tuple[bytes, bytes]]) -> None:
    result = split_payload(encode_form(pairs), FORM)
    forwarded = parse_form(result.body)
    assert not any(name.startswith(b"_") for name, _ in forwarded)
    assert forwarded == [(n, v) for n, v in pairs if not n.startswith(b"_")]
    assert [value for _, value in result.controls] == [v for n, v in pairs if n.startswith(b"_")]
    assert all(name.startswith("_") for name, _ in result.controls)


def test_parse_form_examples() -> None:
    assert parse_form(b"a=1&&b&c=&=d&e=x=y") == [
        (b"a", b"1"),
        (b"b", b""),
        (b"c", b""),
        (b"", b"d"),
        (b"e", b"x=y"),
    ]
    assert parse_form(b"a+b=c%2Bd+%26%3D") == [(b"a b", b"c+d &=")]
    # Raw non-ASCII, %FF and malformed escapes pass through as bytes.
    assert parse_form(b"n=caf\xc3\xa9&m=%ff%zz%") == [(b"n", b"caf\xc3\xa9"), (b"m", b"\xff%zz%")]
    assert parse_form(b"") == []


def test_form_split_example_keeps_order_and_repeats() -> None:
    body = b"a=1&_url=http%3A%2F%2Fexample.com%2Fh%3Fx%3D1&b=&a=2&_retries=3&c=%FF"
    result = split_payload(body, FORM)
    assert result == Payload(
        b"a=1&b=&a=2&c=%FF",
        FORM,
        [("_url", b"http://example.com/h?x=1"), ("_retries", b"3")],
    )


def test_form_escaped_underscore_is_a_control() -> None:
    # %5F is an underscore: the fast path must not skip it.
    result = split_payload(b"x=1&%5Furl=u&%5fdelay=2", FORM)
    assert result.controls == [("_url", b"u"), ("_delay", b"2")]
    assert result.body == b"x=1"


def test_form_without_controls_is_forwarded_unchanged() -> None:
    # Not re-encoded, so "+", "%7e" and the like reach the target as sent.
    for body in (b"a=b+c&d=%7e", b"snake_case=1&x=%5Bq%5D"):
        result = split_payload(body, FORM)
        assert result.body == body
        assert result.controls == []


def test_form_controls_of_any_bytes_are_taken_out() -> None:
    # Whether a control's value must be text is the web layer's decision
    # (only a known control's must): the body never fails on it.
    assert split_payload(b"a=1&_url=%FF&_%FF%FE=1", FORM) == Payload(
        b"a=1", FORM, [("_url", b"\xff"), ("_\\xff\\xfe", b"1")]
    )
    # Payload fields may be any bytes: they are the caller's business.
    assert split_payload(b"a=%FF&_url=u", FORM).body == b"a=%FF"


def test_parse_query() -> None:
    assert parse_query(b"_url=http%3A%2F%2Fx&flag&b=%C3%A9+z&b=2") == [
        ("_url", "http://x"),
        ("flag", ""),
        ("b", "\u00e9 z"),
        ("b", "2"),
    ]
    assert parse_query(b"") == []
    with pytest.raises(PayloadError):
        parse_query(b"_url=%FF")


# -- multipart/form-data --------------------------------------------------------


@given(st.lists(parts, max_size=5))
def test_multipart_round_trips(part_list: List[Part]) -> None:
    body, content_type = encode_multipart(part_list)
    assert content_type.startswith("multipart/form-data; boundary=")
    boundary = content_type.split("boundary=", 1)[1].encode("ascii")
    assert not any(boundary in p.data for p in part_list)
    assert parse_multipart(body, content_type) == part_list


@given(st.lists(st.one_of(payload_parts, control_parts, underscore_files), max_size=6))
def test_multipart_split_drops_only_controls(part_list: List[Part]) -> None:
    body, content_type = encode_multipart(part_list)
    result = split_payload(body, content_type)
    assert result.controls == [(p.name, p.data) for p in part_list if is_control(p)]
    assert result.content_type is not None
    assert result.content_type.startswith("multipart/form-data; boundary=")
    assert parse_multipart(result.body, result.content_type) == [p for p in part_list if not is_control(p)]


@given(st.lists(st.one_of(payload_parts, control_parts), max_size=6))
def test_no_underscore_multipart_field_reaches_the_target(part_list: List[Part]) -> None:
    body, content_type = encode_multipart(part_list)
    result = split_payload(body, content_type)
    forwarded = parse_multipart(result.body, result.content_type or "")
    assert not any(p.name.startswith("_") and p.filename is None for p in forwarded)
    assert forwarded == [p for p in part_list if not is_control(p)]
    assert result.controls == [(p.name, p.data) for p in part_list if is_control(p)]


# Bodies assembled from multipart-looking fragments, to hunt for crashes.
fragments = st.lists(
    st.one_of(
        st.sampled_from(
            [
                b"--b",
                b"\r\n",
                b"--",
                b" ",
                b"\r\n\r\n",
                b'Content-Disposition: form-data; name="a"',
                b'Content-Disposition: form-data; name="_c"',
                b"; filename*=UTF-8''%ff",
                b'; filename="x\\"',
                b"Content-Type: text/plain",
                b"X: \xff",
            ]
        ),
        st.binary(max_size=4),
    ),
    max_size=16,
).map(b"".join)


@given(fragments)
def test_multipart_garbage_is_a_payload_error_or_consistent(body: bytes) -> None:
    try:
        result = split_payload(body, "multipart/form-data; boundary=b")
    except PayloadError:
        return
    assert result.content_type is not None
    kept = parse_multipart(result.body, result.content_type)
    assert kept == [p for p in parse_multipart(body, "multipart/form-data; boundary=b") if not is_control(p)]


# A body captured from `curl -F` (7.88.1); note the %22 curl uses for a quote.
CURL_TYPE = "multipart/form-data; boundary=------------------------1d64ade71ae0b425"
CURL_BODY = (
    b"--------------------------1d64ade71ae0b425\r\n"
    b'Content-Disposition: form-data; name="_url"\r\n'
    b"\r\n"
    b"https://example.com/hook\r\n"
    b"--------------------------1d64ade71ae0b425\r\n"
    b'Content-Disposition: form-data; name="msg"\r\n'
    b"\r\n"
    b"hello world\r\n"
    b"--------------------------1d64ade71ae0b425\r\n"
    b'Content-Disposition: form-data; name="file"; filename="we%22ird.bin"\r\n'
    b"Content-Type: application/octet-stream\r\n"
    b"\r\n"
    b"line1\r\n--not-a-boundary\r\n\x00\xff\r\n"
    b"--------------------------1d64ade71ae0b425\r\n"
    b'Content-Disposition: form-data; name="note"\r\n'
    b"\r\n"
    b"caf\xc3\xa9\r\n"
    b"--------------------------1d64ade71ae0b425--\r\n"
)
CURL_PAYLOAD = [
    Part("msg", b"hello world"),
    Part("file", b"line1\r\n--not-a-boundary\r\n\x00\xff", "we%22ird.bin", "application/octet-stream"),
    Part("note", b"caf\xc3\xa9"),
]


def test_curl_body() -> None:
    assert parse_multipart(CURL_BODY, CURL_TYPE) == [Part("_url", b"https://example.com/hook")] + CURL_PAYLOAD
    result = split_payload(CURL_BODY, CURL_TYPE)
    assert result.controls == [("_url", b"https://example.com/hook")]
    assert result.content_type is not None
    assert result.content_type != CURL_TYPE
    assert parse_multipart(result.body, result.content_type) == CURL_PAYLOAD
    assert b"_url" not in result.body


def test_multipart_preamble_epilogue_padding_and_quoted_boundary() -> None:
    body = (
        b"This is a preamble.\r\n--a b:c \t\r\n"
        b'content-disposition: form-data; name="f"; filename="C:\\\\dir\\\\\\"x\\".txt"\r\n'
        b"X-Thing: kept\r\n"
        b"\r\n"
        b"\r\n--a b:cX is data, and so is \r\n--a b:c-\r\n"
        b"--a b:c\r\n"
        b"Content-Disposition: form-data; name=e\r\n"
        b"\r\n"
        b"--a b:c--\r\nepilogue\r\n--a b:c\r\nnot a part"
    )
    assert parse_multipart(body, 'multipart/form-data; boundary="a b:c"') == [
        Part("f", b"\r\n--a b:cX is data, and so is \r\n--a b:c-", 'C:\\dir\\"x".txt', None, (("X-Thing", "kept"),)),
        Part("e", b""),
    ]


def test_multipart_header_details() -> None:
    body = (
        b"--B\r\n"
        # filename* wins over filename; parameters in any order and case.
        b"Content-Disposition: form-data; FILENAME=\"fallback.txt\"; filename*=UTF-8''%E2%82%AC%20rates.txt; name=\"a;b\"\r\n"
        b"Content-Type:text/csv\r\n"
        b"\r\n"
        b"1,2\r\n"
        b"--B\r\n"
        # Unusable filename* (unknown charset) falls back to filename; folded header.
        b"Content-Disposition: form-data; name=\"x\";\r\n filename=\"caf\xc3\xa9.txt\"; filename*=koi8-r''%C1\r\n"
        b"\r\n"
        b"\r\n"
        b"--B\r\n"
        # Headers and no data: the blank line shares its CRLF with the delimiter.
        b'Content-Disposition: form-data; name="empty"\r\n'
        b"\r\n--B--"
    )
    assert parse_multipart(body, "multipart/form-data; charset=utf-8; BOUNDARY=B") == [
        Part("a;b", b"1,2", "\u20ac rates.txt", "text/csv"),
        Part("x", b"", "caf\u00e9.txt"),
        Part("empty", b""),
    ]


def test_underscore_file_is_payload_and_controls_are_any_bytes() -> None:
    body, content_type = encode_multipart(
        [Part("_x", b"\xff\xfe", "_x.bin"), Part("_retries", b"3"), Part("_token", b"\xff"), Part("a", b"\xff")]
    )
    result = split_payload(body, content_type)
    assert result.controls == [("_retries", b"3"), ("_token", b"\xff")]
    assert parse_multipart(result.body, result.content_type or "") == [
        Part("_x", b"\xff\xfe", "_x.bin"),
        Part("a", b"\xff"),
    ]


def test_encode_multipart_escapes_names() -> None:
    part = Part('a"b\\c\r\nd', b"x", 'f"\n.txt')
    body, content_type = encode_multipart([part])
    head = body.split(b"\r\n\r\n", 1)[0]
    # Only the CRLFs ending header lines, none from the name itself.
    assert head.count(b"\r\n") == 1
    assert b'name="a\\"b\\\\c%0D%0Ad"; filename="f\\"%0A.txt"' in head
    assert parse_multipart(body, content_type) == [Part('a"b\\c%0D%0Ad', b"x", 'f"%0A.txt')]


def test_encode_multipart_rejects_unsafe_headers() -> None:
    with pytest.raises(ValueError):
        encode_multipart([Part("a", b"", content_type="text/plain\r\nX-Evil: 1")])
    with pytest.raises(ValueError):
        encode_multipart([Part("a", b"", headers=(("X-A", "1\n2"),))])
    with pytest.raises(ValueError):
        encode_multipart([Part("a", b"", headers=(("Bad Name", "1"),))])
    with pytest.raises(ValueError):
        encode_multipart([Part("a", b"", headers=(("Content-Type", "x/y"),))])


def test_encode_multipart_boundaries() -> None:
    body, content_type = encode_multipart([], "simple")
    assert (body, content_type) == (b"--simple--\r\n", "multipart/form-data; boundary=simple")
    assert parse_multipart(body, content_type) == []
    body, content_type = encode_multipart([Part("a", b"1")], "has space?")
    assert content_type == 'multipart/form-data; boundary="has space?"'
    assert parse_multipart(body, content_type) == [Part("a", b"1")]
    for bad in ("", "x" * 71, "ends in space ", "quote\"", "caf\u00e9"):
        with pytest.raises(ValueError):
            encode_multipart([], bad)
    with pytest.raises(ValueError):
        encode_multipart([Part("a", b"xx--simple--xx")], "simple")


def test_encode_multipart_regenerates_a_colliding_boundary(monkeypatch: pytest.MonkeyPatch) -> None:
    tokens = iter(["0" * 32, "1" * 32])
    monkeypatch.setattr(payload_module.secrets, "token_hex", lambda n: next(tokens))
    data = b"\r\n--hookah-" + b"0" * 32 + b"--\r\n"
    body, content_type = encode_multipart([Part("a", data)])
    assert content_type == "multipart/form-data; boundary=hookah-" + "1" * 32
    assert parse_multipart(body, content_type) == [Part("a", data)]


@pytest.mark.parametrize(
    "body, content_type",
    [
        (CURL_BODY, "multipart/form-data"),
        (CURL_BODY, "multipart/form-data; boundary="),
        (CURL_BODY, 'multipart/form-data; boundary="unclosed'),
        (CURL_BODY, "multipart/form-data; boundary=caf\u00e9"),
        # Truncated: no closing delimiter.
        (CURL_BODY[: CURL_BODY.rindex(b"\r\n--")], CURL_TYPE),
        (CURL_BODY[:-4], CURL_TYPE),
        (b"", "multipart/form-data; boundary=B"),
        (b"no delimiter here", "multipart/form-data; boundary=B"),
        (b"--B\r\nContent-Disposition: form-data; name=a\r\n\r\nx", "multipart/form-data; boundary=B"),
        (b'--B\r\nContent-Disposition: form-data; name="a"\r\n--B--', "multipart/form-data; boundary=B"),
        (b"--B\r\n\r\nno headers\r\n--B--", "multipart/form-data; boundary=B"),
        (b'--B\r\nContent-Disposition: attachment; name="a"\r\n\r\nx\r\n--B--', "multipart/form-data; boundary=B"),
        (b'--B\r\nContent-Disposition: form-data; filename="a"\r\n\r\nx\r\n--B--', "multipart/form-data; boundary=B"),
        (b'--B\r\nContent-Disposition: form-data; name="a\r\n\r\nx\r\n--B--', "multipart/form-data; boundary=B"),
        (b'--B\r\nContent-Disposition: form-data; name="a"\r\nno colon\r\n\r\nx\r\n--B--', "multipart/form-data; boundary=B"),
        (b'--B\r\nContent-Disposition: form-data; name="a"x\r\n\r\nx\r\n--B--', "multipart/form-data; boundary=B"),
        (b'--B\r\nContent-Disposition: form-data; name="a"\nX: y\r\n\r\nx\r\n--B--', "multipart/form-data; boundary=B"),
    ],
)
def test_multipart_errors(body: bytes, content_type: str) -> None:
    with pytest.raises(PayloadError):
        parse_multipart(body, content_type)
    with pytest.raises(PayloadError):
        split_payload(body, content_type)


# -- everything else --------------------------------------------------------------


@given(
    st.one_of(st.binary(), st.sampled_from([b"_url=x&a=1", CURL_BODY, b'{"_url": "x"}'])),
    raw_types,
)
def test_raw_bodies_are_forwarded_byte_for_byte(body: bytes, content_type: Optional[str]) -> None:
    assert split_payload(body, content_type) == Payload(body, content_type, [])


def test_raw_body_is_not_copied() -> None:
    body = b'{"event": "x"}'
    assert split_payload(body, "application/json").body is body
    assert split_payload(body, None).body is body
