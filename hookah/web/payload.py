"""
The body of a /dispatch request: control parameters out, payload forwarded.

Callers may put Hookah's ``_``-parameters (``_url``, ``_retries``...) in a form
body as well as in the query string, so that a plain HTML form or ``curl -F``
can drive Hookah. The target must then receive the caller's payload, not
Hookah's controls, so form bodies are parsed, stripped of ``_`` fields and
re-encoded. Any other body belongs to the caller alone and is forwarded byte
for byte: it is never parsed, which also keeps the common JSON case cheap.

Everything here is pure (bytes in, values out) and never blocks, so it is safe
on the reactor thread and easy to test exhaustively.
"""

from __future__ import annotations

import re
import secrets
from typing import Dict, Iterable, List, Optional, Sequence, Tuple
from urllib.parse import unquote, unquote_to_bytes, urlencode

import attr

__all__ = [
    "FORM_URLENCODED",
    "MULTIPART_FORM_DATA",
    "Part",
    "Payload",
    "PayloadError",
    "control_name",
    "encode_form",
    "encode_multipart",
    "parse_form",
    "parse_multipart",
    "parse_query",
    "split_payload",
]

FORM_URLENCODED = "application/x-www-form-urlencoded"
MULTIPART_FORM_DATA = "multipart/form-data"

# One ``; name=value`` header parameter. The quoted-string is unrolled
# (``[^"\\]*(?:\\.[^"\\]*)*``) so matching stays linear; a value that opens a
# quote it never closes falls to the bare branch and is rejected by the caller.
_PARAM = re.compile(
    r'(?:[ \t]*;)+[ \t]*([^ \t;=]+)[ \t]*'
    r'(?:=[ \t]*(?:"([^"\\]*(?:\\.[^"\\]*)*)"|([^;]*)))?',
    re.DOTALL,
)
# Only ``\\`` and ``\"`` are unescaped: browsers send backslashes in
# filenames unescaped, and this is the reading that keeps them intact.
_UNESCAPE = re.compile(r'\\([\\"])')
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
_TOKEN_STR = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
_BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]\Z")
_HEADER_HANDLED = frozenset(["content-disposition", "content-type"])
# RFC 5987 only promises these two; anything else (or a codec that is not a
# text encoding) is ignored in favour of the plain ``filename``.
_EXT_CHARSETS = frozenset(["utf-8", "iso-8859-1"])


class PayloadError(ValueError):
    """
    The request body cannot be understood.

    The message is a sentence meant for the caller (it becomes a 400 response
    body), so it says what is wrong with *their* request.
    """


@attr.s(auto_attribs=True, frozen=True, slots=True)
class Payload:
    """
    What to forward to the target, and the controls that were taken out.

    ``controls`` holds every ``_`` field found in the body, in order, as
    (name, raw value): the query string is the web layer's to parse
    (``parse_query``), and it decides precedence. Values stay bytes because
    only the web layer knows which fields are Hookah's own: a known control
    must be UTF-8 text, while an unknown one (Rails' ``_method``, a CSRF
    token) is merely dropped, so its bytes must never make the body fail.
    """

    body: bytes
    content_type: Optional[str]
    controls: List[Tuple[str, bytes]] = attr.Factory(list)


@attr.s(auto_attribs=True, frozen=True, slots=True)
class Part:
    """
    One multipart/form-data part, kept complete enough to be re-encoded.

    ``headers`` carries any part headers besides Content-Disposition and
    Content-Type so that forwarding does not silently lose them.
    """

    name: str
    data: bytes
    filename: Optional[str] = None
    content_type: Optional[str] = None
    headers: Tuple[Tuple[str, str], ...] = ()


def split_payload(body: bytes, content_type: Optional[str]) -> Payload:
    """Separate control fields from the payload and re-encode the payload."""
    if content_type is None:
        return Payload(body, None, [])
    media = content_type.partition(";")[0].strip().lower()
    if media == FORM_URLENCODED:
        return _split_form(body, content_type)
    if media == MULTIPART_FORM_DATA:
        return _split_multipart(body, content_type)
    return Payload(body, content_type, [])


def parse_query(query: bytes) -> List[Tuple[str, str]]:
    """
    Parse a raw query string (bytes after '?') into ordered (name, value) str
    pairs, keep_blank_values, UTF-8 (errors -> PayloadError).
    """
    try:
        return [(n.decode("utf-8"), v.decode("utf-8")) for n, v in parse_form(query)]
    except UnicodeDecodeError:
        raise PayloadError(
            "The query string is not valid UTF-8 once percent-decoded."
        ) from None


# -- application/x-www-form-urlencoded ---------------------------------------


def parse_form(body: bytes) -> List[Tuple[bytes, bytes]]:
    """
    Decode a form body into ordered (name, value) byte pairs, blanks kept.

    Not ``urllib.parse.parse_qsl``: given bytes it insists on ASCII input and
    decodes escapes through str with ``errors="replace"``, so raw UTF-8 and
    ``%FF`` would not survive. Working on bytes forwards whatever was sent.
    """
    pairs = []
    for field in body.split(b"&"):
        if not field:
            continue
        name, _, value = field.partition(b"=")
        pairs.append((_unquote_plus(name), _unquote_plus(value)))
    return pairs


def _unquote_plus(raw: bytes) -> bytes:
    # Most fields contain neither, and skipping the call is measurably faster.
    if b"+" in raw:
        raw = raw.replace(b"+", b" ")
    if b"%" in raw:
        raw = unquote_to_bytes(raw)
    return raw


def encode_form(pairs: Iterable[Tuple[bytes, bytes]]) -> bytes:
    """Encode pairs as a form body; the inverse of ``parse_form``."""
    return urlencode([(name, value) for name, value in pairs]).encode("ascii")


def _split_form(body: bytes, content_type: str) -> Payload:
    # A control name needs ``_`` or its escape ``%5F``; without either there
    # is nothing to strip and the body need not even be parsed.
    if b"_" not in body and b"%5" not in body:
        return Payload(body, content_type, [])
    controls: List[Tuple[str, bytes]] = []
    kept = []
    for name, value in parse_form(body):
        if name.startswith(b"_"):
            controls.append((control_name(name), value))
        else:
            kept.append((name, value))
    if not controls:
        return Payload(body, content_type, [])
    return Payload(encode_form(kept), content_type, controls)


def control_name(raw: bytes) -> str:
    """
    A ``_`` field's name as text. Bytes that are not UTF-8 become ``\\xff``
    escapes rather than an error: such a name can be reported back to the
    caller, and it never equals one of Hookah's (ASCII) control names.
    """
    return raw.decode("utf-8", "backslashreplace")


# -- multipart/form-data (RFC 7578, RFC 2046 section 5.1) --------------------


def parse_multipart(body: bytes, content_type: str) -> List[Part]:
    """
    Split a multipart/form-data body into its parts.

    Hand-written because ``cgi`` is gone in Python 3.13 and the ``email``
    parser is slow and rewrites binary data; this one only slices ``body``, so
    part data comes back exactly as sent.
    """
    boundary = _boundary(content_type)
    dash = b"--" + boundary
    delimiter = b"\r\n" + dash
    found = _delimiter_tail(body, len(dash)) if body.startswith(dash) else None
    if found is None:  # there is a preamble, or no delimiter at all
        _, start, closing = _next_delimiter(body, delimiter, 0)
        if start < 0:
            raise PayloadError(
                "The multipart body does not contain its boundary delimiter."
            )
    else:
        start, closing = found
    parts = []
    while not closing:
        end, following, closing = _next_delimiter(body, delimiter, start)
        if end < 0:
            raise PayloadError(
                "The multipart body ends before its closing boundary delimiter."
            )
        parts.append(_parse_part(body, start, end))
        start = following
    return parts  # anything after the close delimiter is epilogue, ignored


def _boundary(content_type: str) -> bytes:
    _, params = _split_header(content_type)
    boundary = params.get("boundary", "")
    if not boundary:
        raise PayloadError("The multipart Content-Type has no boundary parameter.")
    try:
        return boundary.encode("ascii")
    except UnicodeEncodeError:
        raise PayloadError("The multipart boundary is not ASCII.") from None


def _delimiter_tail(body: bytes, at: int) -> Optional[Tuple[int, bool]]:
    """
    Where the part after a delimiter starts and whether it closed the body, or
    None if what follows ``--boundary`` makes it ordinary data after all.
    """
    if body.startswith(b"--", at):
        return at + 2, True
    end = len(body)
    while at < end and body[at] in b" \t":  # transport padding
        at += 1
    if body.startswith(b"\r\n", at):
        return at + 2, False
    return None


def _next_delimiter(body: bytes, delimiter: bytes, start: int) -> Tuple[int, int, bool]:
    """(where the data before it ends, where the next part starts, closing),
    or (-1, -1, False) if there is no further delimiter."""
    while True:
        at = body.find(delimiter, start)
        if at < 0:
            return -1, -1, False
        tail = _delimiter_tail(body, at + len(delimiter))
        if tail is not None:
            return at, tail[0], tail[1]
        start = at + 1


def _parse_part(body: bytes, start: int, end: int) -> Part:
    if body.startswith(b"\r\n", start, end):  # no headers at all
        head_end, data_start = start, start + 2
    else:
        # ``end + 2``: the blank line may share its CRLF with the delimiter
        # when a part has headers and no data at all.
        head_end = body.find(b"\r\n\r\n", start, end + 2)
        if head_end < 0:
            raise PayloadError("A multipart part has no blank line after its headers.")
        data_start = min(head_end + 4, end)
    disposition = None
    content_type = None
    others = []
    for key, value in _header_lines(body[start:head_end]):
        lower = key.lower()
        if lower == "content-disposition":
            if disposition is None:
                disposition = value
        elif lower == "content-type":
            if content_type is None:
                content_type = value
        else:
            others.append((key, value))
    if disposition is None:
        raise PayloadError("A multipart part has no Content-Disposition header.")
    kind, params = _split_header(disposition)
    if kind != "form-data":
        raise PayloadError("A multipart part's Content-Disposition is not form-data.")
    name = params.get("name")
    if name is None:
        raise PayloadError("A multipart part has no name.")
    filename = params.get("filename")
    extended = params.get("filename*")
    if extended is not None:
        filename = _ext_value(extended) or filename
    return Part(name, body[data_start:end], filename, content_type, tuple(others))


def _header_lines(head: bytes) -> List[Tuple[str, str]]:
    if not head:
        return []
    lines: List[bytes] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and lines:  # obsolete folding
            lines[-1] += b" " + line.strip(b" \t")
        else:
            lines.append(line)
    headers = []
    for line in lines:
        raw_name, sep, raw_value = line.partition(b":")
        raw_name = raw_name.rstrip(b" \t")
        if not sep or not _TOKEN.match(raw_name) or b"\r" in line or b"\n" in line:
            raise PayloadError("A multipart part has a malformed header line.")
        headers.append((raw_name.decode("ascii"), _decode_header(raw_value.strip(b" \t"))))
    return headers


def _decode_header(raw: bytes) -> str:
    # RFC 7578 lets names and filenames be raw UTF-8; a client sending some
    # legacy charset instead still gets a usable (if mis-decoded) string.
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _split_header(value: str) -> Tuple[str, Dict[str, str]]:
    """Split ``type; a=1; b="x"`` into the lower-cased type and its params
    (names lower-cased; the first of a repeated parameter wins)."""
    semicolon = value.find(";")
    if semicolon < 0:
        return value.strip(" \t").lower(), {}
    params: Dict[str, str] = {}
    at, end = semicolon, len(value)
    while at < end:
        match = _PARAM.match(value, at)
        if match is None:
            if value[at:].strip(" \t;"):
                raise PayloadError(f"The header value {value!r} is malformed.")
            break
        quoted, bare = match.group(2), match.group(3)
        if quoted is not None:
            param = _UNESCAPE.sub(r"\1", quoted)
        elif bare is not None:
            param = bare.strip(" \t")
            if param.startswith('"'):
                raise PayloadError(f"The header value {value!r} has an unclosed quote.")
        else:
            param = ""
        params.setdefault(match.group(1).lower(), param)
        at = match.end()
    return value[:semicolon].strip(" \t").lower(), params


def _ext_value(value: str) -> Optional[str]:
    """Decode an RFC 5987 ``charset'lang'%xx`` value, None if unusable."""
    charset, sep, rest = value.partition("'")
    _, sep2, encoded = rest.partition("'")
    charset = charset.lower()
    if not (sep and sep2) or charset not in _EXT_CHARSETS:
        return None
    try:
        return unquote(encoded, encoding=charset, errors="strict")
    except UnicodeDecodeError:
        return None


def encode_multipart(
    parts: Sequence[Part], boundary: Optional[str] = None
) -> Tuple[bytes, str]:
    """
    Encode parts as multipart/form-data; returns (body, full Content-Type).

    Without a boundary a random one is chosen that occurs nowhere in any part
    (headers included), which is what makes the encoding unambiguous whatever
    the data. A given boundary that occurs in a part raises ValueError.
    """
    heads = [_encode_head(part) for part in parts]
    if boundary is None:
        while True:
            boundary = "hookah-" + secrets.token_hex(16)
            marker = boundary.encode("ascii")
            if not _occurs(marker, heads, parts):
                break
    else:
        if not _BOUNDARY.match(boundary):
            raise ValueError(f"{boundary!r} is not a valid multipart boundary.")
        marker = boundary.encode("ascii")
        if _occurs(marker, heads, parts):
            raise ValueError(f"The boundary {boundary!r} occurs in a part.")
    chunks: List[bytes] = []
    for head, part in zip(heads, parts):
        chunks.extend((b"--", marker, b"\r\n", head, b"\r\n", part.data, b"\r\n"))
    chunks.extend((b"--", marker, b"--\r\n"))
    if not _TOKEN_STR.match(boundary):
        boundary = f'"{boundary}"'  # bchars hold no '"' or '\\' to escape
    return b"".join(chunks), f"{MULTIPART_FORM_DATA}; boundary={boundary}"


def _occurs(marker: bytes, heads: List[bytes], parts: Sequence[Part]) -> bool:
    return any(marker in head for head in heads) or any(
        marker in part.data for part in parts
    )


def _encode_head(part: Part) -> bytes:
    """The part's header lines, each ending in CRLF."""
    disposition = b'Content-Disposition: form-data; name=' + _quote(part.name)
    if part.filename is not None:
        disposition += b"; filename=" + _quote(part.filename)
    lines = [disposition]
    if part.content_type is not None:
        lines.append(b"Content-Type: " + _header_value(part.content_type))
    for key, value in part.headers:
        if not _TOKEN_STR.match(key) or key.lower() in _HEADER_HANDLED:
            raise ValueError(f"{key!r} cannot be sent as an extra part header.")
        lines.append(key.encode("ascii") + b": " + _header_value(value))
    lines.append(b"")
    return b"\r\n".join(lines)


def _quote(value: str) -> bytes:
    # Backslash escapes are what RFC 2045 quoted-strings mean; CR and LF are
    # percent-escaped as browsers do, since a raw one would end the header.
    escaped = (
        value.replace("\\", "\\\\")
        .replace('"', '\\"')
        .replace("\r", "%0D")
        .replace("\n", "%0A")
    )
    return b'"' + escaped.encode("utf-8") + b'"'


def _header_value(value: str) -> bytes:
    if "\r" in value or "\n" in value:
        raise ValueError(f"The part header value {value!r} contains CR or LF.")
    return value.encode("utf-8")


def _split_multipart(body: bytes, content_type: str) -> Payload:
    controls: List[Tuple[str, bytes]] = []
    kept = []
    for part in parse_multipart(body, content_type):
        # A file upload named ``_x`` is the caller's data, not an instruction.
        if part.filename is None and part.name.startswith("_"):
            controls.append((part.name, part.data))
        else:
            kept.append(part)
    new_body, new_type = encode_multipart(kept)
    return Payload(new_body, new_type, controls)
