"""
One ``Config`` from defaults, a TOML file, ``HOOKAH_*`` variables and the
command line, in that order of precedence (command line wins).

Every value is parsed and checked here, so that a bad value stops start-up
with one sentence naming the option, before anything listens or writes.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple
from urllib.parse import urlsplit

import attr

from hookah import defaults

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.9/3.10 only
    import tomli as tomllib


class ConfigError(ValueError):
    """A configuration value that Hookah cannot run with; the message says which."""


@attr.s(auto_attribs=True, frozen=True)
class Config:
    listen: str = f"tcp:{defaults.PORT}"
    storage: str = defaults.STORAGE
    allow_private_targets: bool = False
    allowed_networks: Tuple[str, ...] = ()
    retry_schedule: Tuple[float, ...] = defaults.RETRY_SCHEDULE
    timeout: float = defaults.TIMEOUT
    keepalive: float = defaults.KEEPALIVE
    public_url: Optional[str] = None
    signing_secrets: Tuple[str, ...] = ()
    lease_bounds: Tuple[int, int, int] = defaults.LEASE_BOUNDS
    max_body: int = defaults.MAX_BODY
    concurrency: int = defaults.CONCURRENCY
    host_concurrency: int = defaults.HOST_CONCURRENCY
    breaker_threshold: int = defaults.BREAKER_THRESHOLD
    breaker_cooldown: float = defaults.BREAKER_COOLDOWN
    breaker_window: float = defaults.BREAKER_WINDOW
    breaker_pause: float = defaults.BREAKER_PAUSE
    history_count: int = defaults.HISTORY_COUNT
    history_age: float = defaults.HISTORY_AGE
    retention: float = defaults.RETENTION
    idempotency_window: float = defaults.IDEMPOTENCY_WINDOW
    topic_allow: Tuple[str, ...] = ()
    subscribe_tokens: Tuple[str, ...] = ()
    subscribe_open: Tuple[str, ...] = ()
    publisher_tokens: Tuple[str, ...] = ()
    admin_tokens: Tuple[str, ...] = ()
    stream_buffer: int = defaults.STREAM_BUFFER
    log_format: str = "text"
    access_log: bool = False
    cors_origins: Tuple[str, ...] = ()
    head_timeout: float = defaults.HEAD_TIMEOUT
    min_body_rate: int = defaults.MIN_BODY_RATE
    max_connections: int = defaults.MAX_CONNECTIONS
    max_streams: int = defaults.MAX_STREAMS
    backlog: int = defaults.BACKLOG
    workers: int = 1
    claim_lease: float = defaults.CLAIM_LEASE


def _positive_number(name: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"--{name} must be a number of seconds, not {value!r}")
    if not number > 0 or number != number or number == float("inf"):
        raise ConfigError(f"--{name} must be a positive number, not {value!r}")
    return number


def _non_negative_number(name: str, value: Any) -> float:
    try:
        if float(value) == 0:
            return 0.0
    except (TypeError, ValueError):
        pass
    return _positive_number(name, value)


def _integer(name: str, value: Any, minimum: int = 0, maximum: int = 2**31) -> int:
    try:
        number = int(str(value).strip())
    except ValueError:
        raise ConfigError(f"--{name} must be a whole number, not {value!r}")
    if not minimum <= number <= maximum:
        raise ConfigError(f"--{name} must be between {minimum} and {maximum}, not {number}")
    return number


def _listing(value: Any) -> Tuple[str, ...]:
    """A TOML array, or a comma- or space-separated string."""
    if isinstance(value, (list, tuple)):
        return tuple(str(v).strip() for v in value if str(v).strip())
    return tuple(v for v in str(value).replace(",", " ").split() if v)


def _boolean(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"--{name} must be true or false, not {value!r}")


def _port(name: str, value: Any) -> int:
    return _integer(name, value, 0, 65535)


def _workers(name: str, value: Any) -> int:
    """A number of worker processes, or ``auto``: one per core."""
    if str(value).strip().lower() == "auto":
        return max(1, os.cpu_count() or 1)
    return _integer(name, value, 1, 1024)


def check_workers(workers: int, storage: str, listen: str) -> None:
    """
    Several workers need a store they can all write correctly, and a
    listening socket they can share: refused here, in one line, otherwise.
    """
    if workers <= 1:
        return
    if storage == "memory:" or storage.startswith("sqlite:"):
        raise ConfigError(
            f"--workers {workers} needs storage the workers share (PostgreSQL): SQLite has one writer and "
            f"memory: lives in one process; run --workers 1 with --storage {storage}"
        )
    if listen.split(":", 1)[0].lower() not in ("tcp", "tcp6", "unix"):
        raise ConfigError(f"--workers {workers} shares a tcp:, tcp6: or unix: listening socket, not {listen!r}")


def _storage(name: str, value: Any) -> str:
    text = str(value)
    if text == "memory:" or (text.startswith("sqlite:") and len(text) > len("sqlite:")):
        return text
    if text.startswith(("postgresql://", "postgres://")):
        # A libpq URL: what it leaves out comes from the PG* environment
        # variables (PGHOST, PGUSER, PGPASSWORD, ...), as with psql.
        try:
            from psycopg.conninfo import conninfo_to_dict

            conninfo_to_dict(text)
        except ImportError:
            raise ConfigError(
                "--storage postgresql:// needs psycopg: pip install 'hookah[postgres]'"
            )
        except Exception as e:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ConfigError(f"--storage: not a valid PostgreSQL URL: {reason}")
        return text
    raise ConfigError(
        f"--storage must be memory:, sqlite:<path> or postgresql://..., not {text!r}"
    )


def _schedule(name: str, value: Any) -> Tuple[float, ...]:
    steps = _listing(value)
    if not steps:
        raise ConfigError(f"--{name} needs at least one interval in seconds")
    return tuple(_non_negative_number(name, step) for step in steps)


class _NoReactor:
    """
    What an endpoint is built with while its string is only checked: the
    endpoint constructors keep their reactor for ``listen``, which is never
    called here (the service builds its own endpoint on the real reactor).
    """


def _endpoint(name: str, value: Any) -> str:
    """A server endpoint string, checked by building its endpoint (nothing listens yet)."""
    from twisted.internet.endpoints import serverFromString

    text = str(value)
    try:
        serverFromString(_NoReactor(), text)
    except Exception as e:
        raise ConfigError(f"--{name} is not a valid endpoint such as tcp:8080:interface=127.0.0.1: {text!r} ({e})")
    return text


def _public_url(name: str, value: Any) -> str:
    text = str(value)
    try:
        parts = urlsplit(text)
        _ = parts.port  # raises ValueError for a port that is not a number
    except ValueError:
        raise ConfigError(f"--{name} is not a valid URL: {text!r}")
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"--{name} must be an absolute http(s) URL, not {text!r}")
    return text


def _lease_bounds(name: str, value: Any) -> Tuple[int, int, int]:
    numbers = tuple(_integer(name, v, 1) for v in _listing(value))
    if len(numbers) != 3 or not numbers[0] <= numbers[1] <= numbers[2]:
        raise ConfigError(f"--{name} must be three seconds minimum,default,maximum in order, not {value!r}")
    return numbers  # type: ignore[return-value]


def _networks(name: str, value: Any) -> Tuple[str, ...]:
    networks = _listing(value)
    for network in networks:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise ConfigError(f"--{name}: {network!r} is not a network such as 10.0.0.0/8")
    return networks


def _log_format(name: str, value: Any) -> str:
    if value not in ("text", "json"):
        raise ConfigError(f"--{name} must be text or json, not {value!r}")
    return str(value)


def _secrets(name: str, value: Any) -> Tuple[str, ...]:
    return tuple(str(v) for v in (value if isinstance(value, list) else str(value).split()))


def _signing_secrets(name: str, value: Any) -> Tuple[str, ...]:
    from hookah.delivery.signing import secret_key

    secrets = _secrets(name, value)
    for secret in secrets:
        try:
            secret_key(secret)
        except ValueError as e:
            raise ConfigError(f"--{name}: {e}")
    return secrets


def _number(value: float) -> str:
    """A default as the help shows it: ``30``, not ``30.0``."""
    return str(int(value)) if value == int(value) else str(value)


def _numbers(values: Sequence[float]) -> str:
    return ",".join(_number(v) for v in values)


def _cors_origins(name: str, value: Any) -> Tuple[str, ...]:
    """
    ``*``, or origins as browsers send them in ``Origin``: scheme, host and
    a port only when it is not the scheme's default, lower-cased, no path.
    """
    from hookah.web.cors import normalise_origin

    origins = _listing(value)
    if "*" in origins:
        if len(origins) > 1:
            raise ConfigError(f"--{name} is either * (any origin) or a list of origins, not both")
        return origins
    normalised = []
    for origin in origins:
        try:
            normalised.append(normalise_origin(origin))
        except ValueError as e:
            raise ConfigError(f"--{name}: {e}")
    return tuple(dict.fromkeys(normalised))


@attr.s(auto_attribs=True, frozen=True)
class Setting:
    name: str  # the option's name on the command line
    field: str  # the Config attribute
    parse: Callable[[str, Any], Any]
    help: str
    flag: bool = False
    short: Optional[str] = None


SETTINGS: Sequence[Setting] = (
    Setting("port", "port", _port, f"TCP port to listen on [default: {defaults.PORT}]", short="p"),
    Setting("interface", "interface", lambda n, v: str(v), "address to listen on [default: all]"),
    Setting("listen", "listen", _endpoint, "a full endpoint string, e.g. tcp:8080:interface=127.0.0.1 (overrides --port)"),
    Setting("storage", "storage", _storage, f"memory:, sqlite:<path> or postgresql://user@host/db [default: {defaults.STORAGE}]"),
    Setting("allow-private-targets", "allow_private_targets", _boolean, "allow deliveries to loopback and private addresses", flag=True),
    Setting("allowed-networks", "allowed_networks", _networks, "networks deliveries may reach despite the SSRF guard, comma-separated"),
    Setting("retry-schedule", "retry_schedule", _schedule, "seconds between attempts, comma-separated [default: about a day]"),
    Setting("timeout", "timeout", _positive_number, f"seconds per delivery attempt [default: {_number(defaults.TIMEOUT)}]"),
    Setting("keepalive", "keepalive", _positive_number, f"seconds between stream keep-alives [default: {_number(defaults.KEEPALIVE)}]"),
    Setting("public-url", "public_url", _public_url, "this hub's public base URL, for Link: rel=\"hub\""),
    Setting("signing-secret", "signing_secrets", _signing_secrets, "Standard Webhooks secret(s), space-separated, to sign /dispatch deliveries"),
    Setting("lease-bounds", "lease_bounds", _lease_bounds, f"WebSub lease seconds min,default,max [default: {_numbers(defaults.LEASE_BOUNDS)}]"),
    Setting("max-body", "max_body", lambda n, v: _integer(n, v, 1), f"largest request body in bytes [default: {defaults.MAX_BODY}]"),
    Setting("concurrency", "concurrency", lambda n, v: _integer(n, v, 1, 100000), f"delivery attempts in flight at once [default: {defaults.CONCURRENCY}]"),
    Setting("host-concurrency", "host_concurrency", lambda n, v: _integer(n, v, 1, 100000), f"attempts in flight to one host [default: {defaults.HOST_CONCURRENCY}]"),
    Setting("breaker-threshold", "breaker_threshold", lambda n, v: _integer(n, v, 1), f"failures in a row, over --breaker-window, that pause a host [default: {defaults.BREAKER_THRESHOLD}]"),
    Setting("breaker-window", "breaker_window", _non_negative_number, f"seconds a host must keep failing before it is paused [default: {_number(defaults.BREAKER_WINDOW)}]"),
    Setting("breaker-pause", "breaker_pause", _positive_number, f"seconds of a host's first pause, doubled after each failed probe [default: {_number(defaults.BREAKER_PAUSE)}]"),
    Setting("breaker-cooldown", "breaker_cooldown", _positive_number, f"longest pause of a failing host, seconds [default: {_number(defaults.BREAKER_COOLDOWN)}]"),
    Setting("history-count", "history_count", lambda n, v: _integer(n, v, 0), f"events kept per topic [default: {defaults.HISTORY_COUNT}]"),
    Setting("history-age", "history_age", _positive_number, f"seconds events are kept [default: {_number(defaults.HISTORY_AGE)}]"),
    Setting("retention", "retention", _positive_number, f"seconds finished (delivered or failed) deliveries are kept [default: {_number(defaults.RETENTION)}]"),
    Setting("idempotency-window", "idempotency_window", _positive_number, f"seconds an Idempotency-Key is remembered [default: {_number(defaults.IDEMPOTENCY_WINDOW)}]"),
    Setting("topic-allow", "topic_allow", lambda n, v: _listing(v), "topic URL prefixes the hub accepts (all when empty)"),
    Setting("subscribe-token", "subscribe_tokens", _secrets, "bearer token(s) WebSub (un)subscription requests must present, space-separated (open when none)"),
    Setting("subscribe-open", "subscribe_open", lambda n, v: _listing(v), "topic URL prefixes or patterns anyone may subscribe to despite --subscribe-token"),
    Setting("publisher-token", "publisher_tokens", _secrets, "bearer token(s) for /dispatch and publish, space-separated"),
    Setting("admin-token", "admin_tokens", _secrets, "bearer token(s) for the admin endpoints, space-separated"),
    Setting("stream-buffer", "stream_buffer", lambda n, v: _integer(n, v, 1024), f"bytes a slow stream may lag before it is closed [default: {defaults.STREAM_BUFFER}]"),
    Setting("head-timeout", "head_timeout", _non_negative_number, f"seconds a request head may take to arrive, 0 for no limit [default: {defaults.HEAD_TIMEOUT:g}]"),
    Setting("min-body-rate", "min_body_rate", lambda n, v: _integer(n, v, 0), f"bytes per second a request body must keep up, 0 for no limit [default: {defaults.MIN_BODY_RATE}]"),
    Setting("max-connections", "max_connections", lambda n, v: _integer(n, v, 1, 1000000), f"open connections carrying requests at most (streams apart) [default: {defaults.MAX_CONNECTIONS}]"),
    Setting("max-streams", "max_streams", lambda n, v: _integer(n, v, 0, 1000000), f"open /stream responses at most [default: {defaults.MAX_STREAMS}]"),
    Setting("backlog", "backlog", lambda n, v: _integer(n, v, 1, 65535), f"listen queue length for connection bursts [default: {defaults.BACKLOG}]"),
    Setting("workers", "workers", _workers, "processes sharing the listening socket and the store (PostgreSQL), or auto: one per core [default: 1]"),
    Setting("log-format", "log_format", _log_format, "text or json [default: text]"),
    Setting("access-log", "access_log", _boolean, "log a line per HTTP request", flag=True),
    Setting("cors-origins", "cors_origins", _cors_origins, "origins (or *) whose pages may use /stream, /topics, /dispatch and publish cross-origin, comma-separated"),
    Setting("claim-lease", "claim_lease", _positive_number, f"seconds a node's claim on a delivery lasts unrenewed, with postgresql:// storage [default: {defaults.CLAIM_LEASE:g}]"),
)
_BY_NAME: Dict[str, Setting] = {s.name: s for s in SETTINGS}


def with_backlog(listen: str, backlog: int) -> str:
    """``listen`` with ``backlog=`` added, for the endpoint types that take one and do not name it."""
    kind = listen.split(":", 1)[0].lower()
    if kind not in ("tcp", "tcp6", "ssl", "unix") or "backlog=" in listen:
        return listen
    return f"{listen}:backlog={backlog}"


def read_toml(path: str) -> Dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}")
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}")
    table = data.get("hookah", data)
    values: Dict[str, Any] = {}
    for key, value in table.items():
        name = key.replace("_", "-")
        if name not in _BY_NAME:
            raise ConfigError(f"config file {path}: unknown setting {key!r}")
        values[name] = value
    return values


def from_environment(environ: Mapping[str, str]) -> Dict[str, Any]:
    values: Dict[str, Any] = {}
    for name in _BY_NAME:
        key = "HOOKAH_" + name.upper().replace("-", "_")
        if key in environ:
            values[name] = environ[key]
    return values


def build_config(
    command_line: Mapping[str, Any],
    environ: Mapping[str, str],
    config_path: Optional[str] = None,
) -> Config:
    """
    Merge the sources into one checked ``Config``. ``command_line`` holds
    only the options actually given (``None`` values are ignored).
    """
    path = config_path or environ.get("HOOKAH_CONFIG")
    merged: Dict[str, Any] = {}
    sources = [read_toml(path) if path else {}, from_environment(environ)]
    sources.append({k: v for k, v in command_line.items() if v is not None})
    for source in sources:
        # --port or --interface from a stronger source beats a --listen
        # from a weaker one: both say where to listen.
        if ("port" in source or "interface" in source) and "listen" not in source:
            merged.pop("listen", None)
        merged.update(source)
    fields: Dict[str, Any] = {}
    port, interface = defaults.PORT, ""
    for name, raw in merged.items():
        setting = _BY_NAME[name]
        value = setting.parse(name, raw)
        if name == "port":
            port = value
        elif name == "interface":
            interface = value
        else:
            fields[setting.field] = value
    if "listen" not in fields:
        fields["listen"] = f"tcp:{port}" + (
            ":interface=" + interface.replace(":", "\\:") if interface else ""
        )
    config = Config(**fields)
    check_workers(config.workers, config.storage, config.listen)
    return config
