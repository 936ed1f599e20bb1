"""
Target URLs: the one place that says what a URL Hookah sends requests to
means, and whether Hookah may send there.

Every URL Hookah connects to (``/dispatch``'s ``_url``, ``_errback`` and
``_callback``; the hub's ``hub.callback``, ``hub.topic`` and ``hub.url``;
a redirect a topic fetch follows) is read by ``parse_target``: at
submission, when the request is written, and again by the connect-time
guard (``hookah.outbound.ssrf``) on the host the HTTP client hands it. One
reading everywhere is what makes "accepted" mean "can be connected to", and
what makes the SSRF verdict at submission judge the address that will
actually be connected to.

The host is put in the form a resolver and ``inet_aton`` will use:

- UTS 46 mapping (full-width letters and digits, ideographic full stops,
  upper case, ignored code points such as soft hyphens), then IDNA 2008
  A-labels, non-transitional: ``faß.de`` is ``xn--fa-hia.de``, not
  ``fass.de``. Python's own ``"idna"`` codec (IDNA 2003) is never used: it
  maps ``ß`` to ``ss`` and cannot even decode ``xn--fa-hia.de``;
- one trailing dot dropped (``localhost.`` is ``localhost``);
- a host whose last label is numeric is an IPv4 address in any spelling
  ``inet_aton`` accepts (``127.1``, ``0x7f000001``, ``2130706433``,
  ``0177.0.0.1``, ``0``), written as its dotted quad, or is refused: no DNS
  name ends in a number;
- IPv6 literals compressed, without a zone (``[fe80::1%25eth0]`` is refused:
  browsers refuse it too);
- DNS labels of letters, digits, ``-`` and ``_`` (``_`` only over plain
  ``http``); an ``https`` host must be an IP address or a name Twisted's TLS
  layer can verify (IDNA 2008, which refuses ``_``).

The wire form (``Target.wire``) is the URL with that host, an empty path
sent as ``/``, and characters outside printable ASCII percent-encoded
(existing escapes kept); the fragment is never sent.

``AddressPolicy`` is the SSRF rule: which addresses may be reached. At
submission it judges IP literals and the names RFC 6761 reserves for
loopback (``localhost``, ``*.localhost``); other names are judged on every
address they resolve to, at connect time, where DNS rebinding cannot get
past it.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from typing import List, Optional, Sequence, Tuple, Union
from urllib.parse import SplitResult, quote, urlsplit

import attr
import idna

Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

SCHEMES = {"http": 80, "https": 443}
MAX_HOST_LENGTH = 253
# Longer URLs are parsed each time rather than cached: the cache is bounded
# in entries, and this bounds it in bytes too.
_CACHED_LENGTH = 2048

_ASCII_LABEL = re.compile(r"[a-z0-9_-]{1,63}\Z")
# A label that makes the whole host numeric (inet_aton's parts).
_NUMERIC = re.compile(r"(?:0[xX][0-9a-fA-F]*|[0-9]+)\Z")
_DIGITS = re.compile(r"[0-9]+\Z")
_CONTROL_OR_SPACE = re.compile(r"[\x00-\x20\x7f]")
# What stays as it is on the wire: printable ASCII, "%" included so that
# existing escapes are kept; spaces, controls and non-ASCII are encoded.
_WIRE_SAFE = "".join(chr(c) for c in range(0x21, 0x7F))


class TargetRefused(Exception):
    """A destination Hookah will not connect to; retrying will not help."""


class BadURL(TargetRefused, ValueError):
    """
    A URL that is not a usable http(s) target; the message says why and
    names the field. ``kind`` is one of ``malformed``, ``scheme``,
    ``userinfo``, ``port``, ``host``, ``whitespace``, for callers that add
    advice of their own.
    """

    def __init__(self, message: str, kind: str = "malformed") -> None:
        super().__init__(message)
        self.kind = kind


@attr.s(auto_attribs=True, frozen=True, slots=True)
class Target:
    """A parsed target URL: where it connects and what the request line carries."""

    scheme: str
    # Canonical: a dotted quad, a compressed IPv6 address (no brackets), or
    # a lower-case ASCII name (A-labels) without a trailing dot.
    host: str
    # The port connected to (the scheme's default when none is given).
    port: int
    # The host as an address when it is one, else None (a name to resolve).
    address: Optional[Address]
    # The URL as the HTTP client sends it (ASCII).
    wire: bytes

    @property
    def key(self) -> str:
        """Scheme, host and port: what per-host limits count by."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def _show(url: str) -> str:
    return repr(url if len(url) <= 200 else url[:200] + "...")


def parse_target(url: str, name: str = "The URL") -> Target:
    """
    ``url`` as a target, or ``BadURL`` saying why it cannot be one (naming
    it ``name``, e.g. ``_url``). Spaces and controls in the path or query
    are percent-encoded here; ``check_submitted`` refuses them outright.
    """
    try:
        if len(url) <= _CACHED_LENGTH:
            return _parse_cached(url)
        return _parse(url)
    except _Invalid as e:
        raise BadURL(e.message(name, url), e.kind) from None


def check_submitted(url: str, name: str) -> Target:
    """
    The submission rule for a target URL (``/dispatch``, ``/hub``): what
    ``parse_target`` accepts, without whitespace or control characters
    anywhere (those are a copy-and-paste accident far more often than a
    URL anyone meant; Python's URL parser would silently drop some).
    """
    if _CONTROL_OR_SPACE.search(url) or (not url.isascii() and any(c.isspace() for c in url)):
        raise BadURL(f"{name} cannot be sent: it contains whitespace or a control character: {_show(url)}.", "whitespace")
    return parse_target(url, name)


def wire_url(url: str) -> bytes:
    """The URL as the bytes an HTTP agent takes (``Target.wire``); ``BadURL`` if it has none."""
    return parse_target(url).wire


def host_key(url: str) -> str:
    """
    Scheme, canonical host and port, what per-host limits count by (so
    ``127.1`` and ``127.0.0.1`` are one host). Never raises: a URL that
    cannot be parsed (stored before these rules) is its own key, and fails
    when attempted.
    """
    try:
        return parse_target(url).key
    except BadURL:
        return url


class _Invalid(Exception):
    """Why a URL is not a target, before the field's name is known."""

    def __init__(self, template: str, kind: str = "malformed") -> None:
        super().__init__(template)
        self.template = template
        self.kind = kind

    def message(self, name: str, url: str) -> str:
        return self.template.format(name=name, url=_show(url))


@functools.lru_cache(maxsize=1024)
def _parse_cached(url: str) -> Target:
    return _parse(url)


def _parse(url: str) -> Target:
    try:
        parts = urlsplit(url)
    except ValueError:
        # An unclosed "[", or a host that NFKC-normalises to "/", "@"...
        raise _Invalid("{name} is not a well-formed URL: {url}.")
    scheme = parts.scheme
    if scheme not in SCHEMES or not parts.netloc:
        raise _Invalid("{name} must be an absolute http or https URL, not {url}.", "scheme")
    host_text, port_text = _split_netloc(parts.netloc)
    given_port: Optional[int] = None
    if port_text:  # "http://h:/" is "http://h/" (RFC 3986 3.2.3)
        digits = port_text.lstrip("0") or "0"
        if not _DIGITS.match(port_text) or len(digits) > 5 or not 0 < int(digits) <= 65535:
            raise _Invalid("{name} has an invalid port (it must be 1 to 65535): {url}.", "port")
        given_port = int(digits)
    try:
        host, address = canonical_host(host_text, https=scheme == "https")
    except ValueError as e:
        raise _Invalid(f"{{name}} cannot be sent: its host {_braces(repr(host_text))} {_braces(str(e))}.", "host")
    port = given_port if given_port is not None else SCHEMES[scheme]
    return Target(scheme, host, port, address, _wire(scheme, host, given_port, parts))


def _braces(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


def _split_netloc(netloc: str) -> Tuple[str, str]:
    """(host, port text) of an authority; refuses userinfo."""
    if "@" in netloc:
        # The HTTP client would take "user:pass@host" for the host, and
        # credentials in a stored URL would show wherever the URL does.
        raise _Invalid(
            "{name} must not contain a user name or password (user:password@host).",
            "userinfo",
        )
    if netloc.startswith("["):
        end = netloc.find("]")
        if end < 0:
            raise _Invalid("{name} is not a well-formed URL: {url}.")
        host, rest = netloc[: end + 1], netloc[end + 1:]
        if rest and not rest.startswith(":"):
            raise _Invalid("{name} is not a well-formed URL: {url}.")
        return host, rest[1:]
    host, _, port = netloc.partition(":")
    if ":" in port:
        raise _Invalid("{name} has an invalid port (it must be 1 to 65535): {url}.", "port")
    return host, port


def canonical_host(host: str, https: bool = False) -> Tuple[str, Optional[Address]]:
    """
    The host as it will be resolved or connected to, and its address when
    it is an IP literal. ``host`` is as it appears in a URL (IPv6 in
    brackets; a bare IPv6 address is taken too). Raises ``ValueError`` with
    the end of a sentence ("is not ...") saying why it cannot be a host.
    """
    if host.startswith("[") or ":" in host:
        inner = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        if "%" in inner:
            raise ValueError("has an IPv6 zone identifier, which cannot be used in a URL")
        try:
            ip6 = ipaddress.IPv6Address(inner)
        except ValueError:
            raise ValueError("is not an IPv6 address")
        return str(ip6), ip6
    if host.isascii():
        name = host.lower()
    else:
        try:
            name = idna.uts46_remap(host, std3_rules=False, transitional=False)
        except idna.IDNAError as e:
            raise ValueError(f"is not a valid international domain name ({e})")
    if name.endswith("."):
        name = name[:-1]
    if not name:
        raise ValueError("is empty")
    labels = name.split(".")
    if _NUMERIC.match(labels[-1]):
        ip4 = _inet_aton(labels)
        if ip4 is None:
            raise ValueError("is not an IPv4 address (and no DNS name ends in a number)")
        return str(ip4), ip4
    encoded = ".".join(_label(label) for label in labels)
    if len(encoded) > MAX_HOST_LENGTH:
        raise ValueError(f"is longer than {MAX_HOST_LENGTH} characters")
    if https:
        # Exactly what Twisted's TLS layer does with the name to verify
        # the certificate: refusing here is refusing what it would.
        try:
            idna.encode(encoded)
        except idna.IDNAError:
            raise ValueError(
                "is not a name TLS can verify (https needs an IP address or an IDNA 2008 name: no '_', "
                "no '-' at the start or end of a label, nor '--' as its 3rd and 4th characters)"
            )
    return encoded, None


def _label(label: str) -> str:
    """One DNS label as ASCII: lower-case LDH (or ``_``), an A-label checked, or a U-label encoded."""
    if not label:
        raise ValueError("has an empty label")
    if label.isascii():
        if not _ASCII_LABEL.match(label):
            raise ValueError("is not a valid host name, IPv4 or IPv6 address")
        if label.startswith("xn--"):
            try:
                idna.ulabel(label)
            except (idna.IDNAError, UnicodeError):
                raise ValueError(f"has a label {label!r} that is not a valid IDNA A-label")
        return label
    try:
        return idna.alabel(label).decode("ascii")
    except (idna.IDNAError, UnicodeError) as e:
        raise ValueError(f"is not a valid international domain name ({e})")


def _inet_aton(labels: Sequence[str]) -> Optional[ipaddress.IPv4Address]:
    """
    The address ``inet_aton`` (and so ``getaddrinfo``) reads from these
    dot-separated parts: 1 to 4 numbers, each decimal, octal (leading ``0``)
    or hex (``0x``); the last fills the remaining bytes.
    """
    if not 1 <= len(labels) <= 4:
        return None
    values: List[int] = []
    for part in labels:
        if part[:2] in ("0x", "0X"):
            digits, base = part[2:], 16
        elif part.startswith("0") and len(part) > 1:
            digits, base = part[1:], 8
        else:
            digits, base = part, 10
        digits = digits.lstrip("0") or "0"
        if len(digits) > 12:  # beyond 2**32 in any base; and int() refuses huge strings
            return None
        try:
            values.append(int(digits, base))
        except ValueError:  # "08", "0xg", a non-numeric part
            return None
    *head, last = values
    if any(v > 255 for v in head) or last >= 256 ** (4 - len(head)):
        return None
    number = last
    for i, v in enumerate(head):
        number += v << (8 * (3 - i))
    return ipaddress.IPv4Address(number)


def _escape(text: str) -> str:
    if text.isascii() and not _CONTROL_OR_SPACE.search(text):
        return text
    return quote(text, safe=_WIRE_SAFE)


def _wire(scheme: str, host: str, port: Optional[int], parts: SplitResult) -> bytes:
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc += f":{port}"
    wire = f"{scheme}://{netloc}{_escape(parts.path) or '/'}"
    if parts.query:
        wire += "?" + _escape(parts.query)
    return wire.encode("ascii")


# -- the SSRF verdict -----------------------------------------------------------


class AddressPolicy:
    """Which addresses outgoing requests may reach."""

    def __init__(self, allow_private: bool = False, allowed_networks: Sequence[str] = ()) -> None:
        self.allow_private = allow_private
        self.networks = [ipaddress.ip_network(n, strict=False) for n in allowed_networks]

    def refusal(self, address: str) -> Optional[str]:
        """Why ``address`` (an IP address as text, as a resolver returns it) is refused, or ``None``."""
        if self.allow_private:
            return None
        try:
            ip: Address = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return f"{address} is not an IP address"
        if any(ip in network for network in self.networks):
            return None
        # ::ffff:10.0.0.1 reaches 10.0.0.1: judge the IPv4 address inside.
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            if any(ip.ipv4_mapped in network for network in self.networks):
                return None
            ip = ip.ipv4_mapped
        # 2002:7f00:1::/48 (6to4) is tunnelled to the IPv4 address inside.
        if isinstance(ip, ipaddress.IPv6Address) and ip.sixtofour is not None:
            inner = _non_public_kind(ip.sixtofour)
            if inner is not None and not any(ip.sixtofour in network for network in self.networks):
                return f"{ip} is a 6to4 address of {ip.sixtofour}, {_article(inner)} {inner} address"
        kind = _non_public_kind(ip)
        if kind is None:
            return None
        return f"{ip} is {_article(kind)} {kind} address"

    def host_refusal(self, host: str, address: Optional[Address]) -> Optional[str]:
        """
        For a canonical host (``canonical_host``): why it is refused before
        any lookup, if it is. An IP literal is judged as it is; the names
        RFC 6761 reserves for loopback are judged as loopback; other names
        can only be judged on what they resolve to.
        """
        if self.allow_private:
            return None
        if address is not None:
            return self.refusal(str(address))
        if host == "localhost" or host.endswith(".localhost"):
            if self.refusal("127.0.0.1") is None or self.refusal("::1") is None:
                return None
            return f"{host} is a loopback name (RFC 6761)"
        return None

    def target_refusal(self, target: Target) -> Optional[str]:
        return self.host_refusal(target.host, target.address)

    def literal_refusal(self, url: str) -> Optional[str]:
        """For a target URL: why it is refused before any lookup (``host_refusal``), if it is."""
        if self.allow_private:
            return None  # nothing to parse
        try:
            target = parse_target(url)
        except BadURL:
            return None  # not a target at all: the URL check reports it
        return self.target_refusal(target)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _non_public_kind(ip: Address) -> Optional[str]:
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:
        # fec0::/10, deprecated but still routed inside some networks.
        return "site-local"
    if ip.is_multicast:
        return "multicast"
    if ip.is_private:
        return "private"
    if ip.is_reserved:
        return "reserved"
    if not ip.is_global:
        return "non-public"
    return None
