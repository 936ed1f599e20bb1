"""
``hookah``: the command line for people who run or use a Hookah.

Client commands talk to a running server over HTTP (``hookah.cli.client``);
``serve`` runs the server itself, built by the same ``hookah.tap`` code as
``twistd hookah``. Every failure is one line on stderr and a non-zero exit
status: 1 the server refused the request, 2 bad usage, 3 the server could
not be reached.
"""

from __future__ import annotations

import argparse
import json
import mimetypes
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

from hookah import __version__, defaults
from hookah.cli.batch import dispatch_headers, ignored_notice, say, send_lines
from hookah.cli.client import STREAM_FORMATS, ClientError, HookahClient, ServerError, UsageError, follow

DEFAULT_SERVER = defaults.SERVER_URL

EPILOG = f"""\
environment:
  HOOKAH_SERVER   the server URL (default {DEFAULT_SERVER})
  HOOKAH_TOKEN    the bearer token; safer than --token, which other users may see in `ps`

exit status: 0 done, 1 the server refused the request, 2 bad usage, 3 the server is unreachable.
"""


# -- building requests ---------------------------------------------------------


def header_option(value: str) -> Tuple[str, str]:
    name, sep, text = value.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"headers look like Name:value, not {value!r}")
    return name.strip(), text.strip()


def body_from(args: argparse.Namespace) -> Tuple[bytes, Optional[str]]:
    """The payload and its Content-Type from --data, --json or --file."""
    content_type = args.content_type
    if args.json is not None:
        try:
            json.loads(args.json)
        except ValueError as e:
            raise UsageError(f"--json is not valid JSON: {e}")
        return args.json.encode("utf-8"), content_type or "application/json"
    if args.data is not None:
        return args.data.encode("utf-8"), content_type or "text/plain; charset=utf-8"
    if args.file is not None:
        try:
            if args.file == "-":
                data = sys.stdin.buffer.read()
            else:
                with open(args.file, "rb") as f:
                    data = f.read()
        except OSError as e:
            raise UsageError(f"cannot read {args.file}: {e.strerror}")
        guessed = mimetypes.guess_type(args.file)[0] if args.file != "-" else None
        return data, content_type or guessed or "application/octet-stream"
    return b"", content_type


def dispatch_query(destination: Tuple[str, str], args: argparse.Namespace) -> List[Tuple[str, str]]:
    query = [destination]
    for option, name in (("retries", "_retries"), ("delay", "_delay"), ("timeout", "_timeout"),
                         ("errback", "_errback"), ("callback", "_callback")):
        value = getattr(args, option, None)
        if value is not None:
            query.append((name, str(value)))
    return query


# -- commands -------------------------------------------------------------------


def client_for(args: argparse.Namespace) -> HookahClient:
    return HookahClient(args.server, args.token or None, timeout=args.request_timeout)


def cmd_dispatch(args: argparse.Namespace) -> int:
    if args.from_file is not None:
        if args.url or args.data is not None or args.json is not None or args.file is not None:
            raise UsageError("--from-file takes its URLs and payloads from the file; give no URL, --data, --json or --file")
        return dispatch_many(args)
    if not args.url:
        raise UsageError("give the target URL (hookah dispatch https://example.com/hook --json '{...}') or --from-file")
    return send_one(args, ("_url", args.url))


def cmd_publish(args: argparse.Namespace) -> int:
    return send_one(args, ("_topic", args.topic))


def send_one(args: argparse.Namespace, destination: Tuple[str, str]) -> int:
    body, content_type = body_from(args)
    client = client_for(args)
    reply = client.call(
        "POST",
        client.path("/dispatch", dispatch_query(destination, args)),
        body,
        dispatch_headers(content_type, args.header, args.idempotency_key),
    )
    if args.json_output:
        print(json.dumps(reply))
    else:
        print(reply.get("id", ""))
        if reply.get("subscribers") is not None:
            say(f"published to {reply['subscribers']} subscriber(s) and the topic's open streams")
        if reply.get("duplicate"):
            say("duplicate: this idempotency key was used before; nothing new was queued")
        notice = ignored_notice(reply)
        if notice:
            say(notice)
    return 0


def dispatch_many(args: argparse.Namespace) -> int:
    """Send every JSON line of --from-file (see ``hookah.cli.batch``)."""
    try:
        if args.from_file == "-":
            text = sys.stdin.read()
        else:
            with open(args.from_file, encoding="utf-8") as f:
                text = f.read()
    except OSError as e:
        raise UsageError(f"cannot read {args.from_file}: {e.strerror}")
    except UnicodeDecodeError:
        raise UsageError(f"{args.from_file} is not UTF-8 text")
    work = [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    sent, failed, seconds = send_lines(
        client_for(args), work, lambda destination: dispatch_query(destination, args), args.header
    )
    say(f"sent {sent} of {len(work)} in {seconds:.1f}s" + (f"; {failed} failed" if failed else ""))
    return 1 if failed else 0


def cmd_tail(args: argparse.Namespace) -> int:
    client = client_for(args)

    def on_event(event: Dict[str, Any]) -> None:
        if args.data_only:
            data = event.get("data")
            sys.stdout.write((data if isinstance(data, str) else json.dumps(data)) + "\n")
        else:
            sys.stdout.write(json.dumps(event, ensure_ascii=False) + "\n")
        sys.stdout.flush()

    def on_notice(message: str) -> None:
        if not args.quiet:
            say(f"tail: {message}")

    follow(
        client,
        args.topics,
        on_event,
        on_notice,
        count=args.count,
        last_event_id=args.last_event_id,
        limit=args.limit,
        idle_timeout=args.idle_timeout,
        first_delay=args.reconnect_delay,
        stream_format=args.format,
        # Events may have been missed: said even with --quiet.
        on_warning=lambda message: say(f"tail: {message}"),
    )
    return 0


def _last_result(delivery: Dict[str, Any]) -> str:
    attempts = delivery.get("attempts") or []
    if not attempts:
        return "-"
    last = attempts[-1]
    return str(last.get("status_code") or last.get("error") or "-")[:20]


def cmd_deliveries(args: argparse.Namespace) -> int:
    status = "failed" if args.failed else args.status
    query = [("limit", str(args.limit))]
    if status:
        query.append(("status", status))
    if args.after:
        query.append(("after", args.after))
    client = client_for(args)
    reply = client.call("GET", client.path("/dispatch", query))
    if args.json_output:
        print(json.dumps(reply))
        return 0
    rows = reply.get("deliveries", [])
    if not rows:
        say("no deliveries" + (f" with status {status}" if status else ""))
        return 0
    print(f"{'ID':26}  {'STATUS':10}  {'TRIES':>5}  {'LAST':<20}  URL")
    for d in rows:
        print(f"{d.get('id', ''):26}  {d.get('status', ''):10}  {len(d.get('attempts') or []):>5}  {_last_result(d):<20}  {d.get('url', '')}")
    if reply.get("next"):
        say(f"more: hookah deliveries --after {reply['next']}" + (" --failed" if args.failed else ""))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    client = client_for(args)
    reply = client.call("GET", client.path(f"/dispatch/{quote_id(args.id)}"))
    print(json.dumps(reply, indent=2))
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    client = client_for(args)
    reply = client.call("POST", client.path(f"/dispatch/{quote_id(args.id)}/retry"))
    print(f"{reply.get('id', args.id)} {reply.get('status', 'scheduled')}")
    return 0


def quote_id(delivery_id: str) -> str:
    from urllib.parse import quote

    return quote(delivery_id, safe="")


def cmd_token(args: argparse.Namespace) -> int:
    """Mint a stream token for a browser page (``POST /stream/tokens``, which needs the admin token)."""
    client = client_for(args)
    query = [("topic", topic) for topic in args.topic] + [("ttl", str(args.ttl))]
    reply = client.call("POST", client.path("/stream/tokens", query))
    if args.json_output:
        print(json.dumps(reply))
        return 0
    print(reply.get("token", ""))
    topics = ", ".join(str(t) for t in reply.get("topics") or [])
    say(f"reads {topics} from /stream?topic=...&access_token=<token> for {reply.get('expires_in')}s (until {reply.get('expires_at')})")
    return 0


def cmd_serve(argv: List[str]) -> int:
    """Run the server in the foreground: ``twistd -n hookah`` without twistd."""
    from hookah.cli.serve import serve

    return serve(argv)


def cmd_migrate(args: argparse.Namespace) -> int:
    """Upgrade the database's schema (what every node also does at start-up)."""
    from hookah.cli.migrate import migrate

    try:
        applied, version = migrate(args.storage)
    except Exception as e:
        say(f"migrate: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}")
        return 1
    print(f"schema version {version}: {applied} migration(s) applied" if applied else f"schema version {version}: up to date")
    return 0


# -- the parser -------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--server", default=os.environ.get("HOOKAH_SERVER", DEFAULT_SERVER), metavar="URL",
                        help="the Hookah to talk to (default: $HOOKAH_SERVER or %(default)s)")
    common.add_argument("--token", default=os.environ.get("HOOKAH_TOKEN"),
                        help="bearer token, when the server asks for one (default: $HOOKAH_TOKEN)")
    common.add_argument("--request-timeout", type=float, default=defaults.CLIENT_TIMEOUT, metavar="SECONDS",
                        help="give up on a request after this long (default: %(default)s)")

    payload = argparse.ArgumentParser(add_help=False)
    body = payload.add_mutually_exclusive_group()
    body.add_argument("--data", "-d", help="the payload as text (sent as text/plain unless --content-type)")
    body.add_argument("--json", "-j", help="the payload as JSON (checked, sent as application/json)")
    body.add_argument("--file", "-f", help="the payload from a file, or - for stdin (type guessed from the name)")
    payload.add_argument("--content-type", help="Content-Type of the payload")
    payload.add_argument("--header", "-H", action="append", type=header_option, default=[], metavar="NAME:VALUE",
                         help="add a header to the delivered request (repeatable)")
    payload.add_argument("--retries", type=int, help="retries for this delivery (0: one attempt only)")
    payload.add_argument("--delay", type=float, metavar="SECONDS", help="do not attempt before this many seconds")
    payload.add_argument("--timeout", type=float, metavar="SECONDS", help="per-attempt timeout for this delivery")
    payload.add_argument("--errback", metavar="URL", help="POST a report here if the delivery finally fails")
    payload.add_argument("--callback", metavar="URL", help="POST the target's 2xx response here")
    payload.add_argument("--idempotency-key", metavar="KEY", help="send this key; a repeat within the window queues nothing")
    payload.add_argument("--json-output", action="store_true", help="print the server's JSON reply instead of the id")

    parser = argparse.ArgumentParser(
        prog="hookah",
        description="Talk to a Hookah (durable webhooks, WebSub hub, streams), or run one.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"hookah {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    def command(name: str, help: str, parents: Sequence[argparse.ArgumentParser], example: str) -> argparse.ArgumentParser:
        return commands.add_parser(
            name, help=help, description=help, parents=list(parents), epilog=f"example:\n  {example}\n\n{EPILOG}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    p = command("dispatch", "queue a webhook: POST a payload to a URL, retried until it is delivered",
                [common, payload], "hookah dispatch https://example.com/hook --json '{\"order\": 42}' -H X-Source:shop")
    p.add_argument("url", nargs="?", help="the target URL")
    p.add_argument("--from-file", metavar="FILE",
                   help='send many: one JSON object per line, {"url": ..., "json": ... | "data": ..., "headers": {...}} '
                        "(- for stdin); prints each id, a progress bar on stderr and a summary")
    p.set_defaults(run=cmd_dispatch)

    p = command("publish", "publish an event to a topic: its WebSub subscribers and open streams receive it",
                [common, payload], "hookah publish orders --json '{\"order\": 42}'")
    p.add_argument("topic", help="the topic")
    p.set_defaults(run=cmd_publish)

    p = command("tail", "print a topic's events as they arrive (follows /stream, reconnects without losing events)",
                [common], "hookah tail orders payments --count 10")
    p.add_argument("topics", nargs="+", metavar="TOPIC", help="topics to follow")
    p.add_argument("--count", type=int, default=0, help="first replay the last N events")
    p.add_argument("--last-event-id", metavar="ID", help="resume after this event id")
    p.add_argument("--limit", type=int, metavar="N", help="exit after N events")
    p.add_argument("--data-only", action="store_true", help="print only each event's data, not the whole event")
    p.add_argument("--format", choices=sorted(STREAM_FORMATS), default="json",
                   help="the stream format to read (json lines, length-delimited, or Server-Sent Events); "
                        "the output is the same (default: %(default)s)")
    p.add_argument("--idle-timeout", type=float, default=120.0, metavar="SECONDS",
                   help="reconnect when nothing, not even a keep-alive, arrives for this long (default: %(default)s)")
    p.add_argument("--reconnect-delay", type=float, default=1.0, metavar="SECONDS",
                   help="first wait before reconnecting, doubled up to 30s (default: %(default)s)")
    p.add_argument("--quiet", "-q", action="store_true", help="no connection notices on stderr")
    p.set_defaults(run=cmd_tail)

    p = command("deliveries", "list deliveries and their status", [common], "hookah deliveries --failed --limit 50")
    p.add_argument("--failed", action="store_true", help="only failed deliveries")
    p.add_argument("--status", choices=("scheduled", "delivering", "delivered", "failed"), help="only this status")
    p.add_argument("--limit", type=int, default=20, help="at most N (default: %(default)s)")
    p.add_argument("--after", metavar="ID", help="the page after this delivery id")
    p.add_argument("--json-output", action="store_true", help="print the server's JSON reply")
    p.set_defaults(run=cmd_deliveries)

    p = command("show", "show one delivery with its attempts", [common], "hookah show 01J9Z...")
    p.add_argument("id", help="the delivery id")
    p.set_defaults(run=cmd_show)

    p = command("retry", "resend a delivered or failed delivery", [common], "hookah retry 01J9Z...")
    p.add_argument("id", help="the delivery id")
    p.set_defaults(run=cmd_retry)

    p = command("token", "mint a short-lived token that lets a browser page read topics from /stream (admin)",
                [common], "hookah token --topic orders --ttl 600")
    p.add_argument("--topic", action="append", required=True, help="a topic the token may read (repeatable)")
    p.add_argument("--ttl", type=int, default=600, metavar="SECONDS", help="seconds the token is valid (default: %(default)s, at most 86400)")
    p.add_argument("--json-output", action="store_true", help="print the server's JSON reply")
    p.set_defaults(run=cmd_token)

    p = command("migrate", "bring a database's schema up to this Hookah's version (nodes also do it at start-up)",
                [], "hookah migrate --storage postgresql://hookah@db.internal/hookah")
    p.add_argument("--storage", default=os.environ.get("HOOKAH_STORAGE"), required=not os.environ.get("HOOKAH_STORAGE"),
                   help="postgresql://... or sqlite:<path> (default: $HOOKAH_STORAGE)")
    p.set_defaults(run=cmd_migrate)

    commands.add_parser(
        "serve",
        help="run Hookah in the foreground (the same service as `twistd -n hookah`; `hookah serve --help` for its options)",
        add_help=False,
    )
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # serve hands every option to the server's own parser (hookah.tap.Options).
    if argv and argv[0] == "serve":
        return cmd_serve(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except ClientError as e:
        say(str(e))
        if isinstance(e, ServerError) and e.status == 401 and not args.token:
            say("this server needs a token: give --token or set HOOKAH_TOKEN")
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader of our output went away (| head): not an error of ours.
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
