"""
``hookah dispatch --from-file``: many dispatches from JSON lines, on one
connection, with a progress bar on stderr.

A bad line is reported and counted, and the rest go on; a server that stops
answering ends the run at once (every further line would fail the same way).
"""

from __future__ import annotations

import json
import sys
import time
from typing import IO, Any, Callable, Dict, List, Optional, Sequence, Tuple

from hookah.cli.client import ClientError, HookahClient, ServerError, UsageError

Destination = Tuple[str, str]


def say(message: str, stream: Optional[IO[str]] = None) -> None:
    out = stream or sys.stderr
    out.write(f"hookah: {message}\n")
    out.flush()


class Progress:
    """
    A progress bar on stderr: redrawn in place on a terminal, and a plain
    line every tenth of the way otherwise (a log file gets no carriage returns).
    """

    def __init__(self, total: int, out: IO[str], width: int = 30) -> None:
        self.total = max(total, 0)
        self.out = out
        self.width = width
        self.tty = out.isatty()
        self.started = time.monotonic()
        self._drawn = 0.0
        self._decile = -1

    def line(self, done: int, failed: int) -> str:
        fraction = done / self.total if self.total else 1.0
        filled = int(fraction * self.width)
        bar = "#" * filled + "-" * (self.width - filled)
        elapsed = time.monotonic() - self.started
        rate = done / elapsed if elapsed > 0 else 0.0
        return f"[{bar}] {done}/{self.total} {fraction:4.0%}  {failed} failed  {rate:.0f}/s"

    def update(self, done: int, failed: int, force: bool = False) -> None:
        if self.tty:
            now = time.monotonic()
            if force or now - self._drawn >= 0.1:
                self._drawn = now
                self.out.write("\r" + self.line(done, failed))
                self.out.flush()
            return
        decile = int(10 * done / self.total) if self.total else 10
        if decile != self._decile and (force or decile > self._decile):
            self._decile = decile
            self.out.write(self.line(done, failed) + "\n")
            self.out.flush()

    def interrupt(self, message: str) -> None:
        """Print a message without leaving half a bar in front of it."""
        if self.tty:
            self.out.write("\r\033[K")
        say(message, self.out)

    def finish(self, done: int, failed: int) -> None:
        self.update(done, failed, force=True)
        if self.tty:
            self.out.write("\n")
            self.out.flush()


def ignored_notice(reply: Dict[str, Any]) -> Optional[str]:
    """
    The sentence that tells a user which of their ``_`` fields the server
    did not know and dropped (a typo such as ``_retry`` shows up here).
    """
    ignored = reply.get("ignored")
    if not isinstance(ignored, list) or not ignored:
        return None
    return "ignored unknown control field(s), not sent to the target: " + ", ".join(str(name) for name in ignored)


def dispatch_headers(content_type: Optional[str], headers: Sequence[Tuple[str, str]], key: Optional[str]) -> Dict[str, str]:
    out: Dict[str, str] = {}
    if content_type:
        out["Content-Type"] = content_type
    for name, value in headers:
        out[f"X-Hookah-Header-{name}"] = value
    if key:
        out["Idempotency-Key"] = key
    return out


def parse_line(text: str) -> Tuple[Tuple[str, str], bytes, Optional[str], List[Tuple[str, str]], Optional[str]]:
    """One --from-file line: {"url"|"topic", "json"|"data", "headers"?, "content_type"?, "id"?}."""
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise UsageError(f"not JSON ({e})")
    if not isinstance(obj, dict):
        raise UsageError("each line must be a JSON object")
    if bool(obj.get("url")) == bool(obj.get("topic")):
        raise UsageError('give exactly one of "url" and "topic"')
    destination = ("_url", str(obj["url"])) if obj.get("url") else ("_topic", str(obj["topic"]))
    content_type = obj.get("content_type")
    if "json" in obj:
        body, content_type = json.dumps(obj["json"]).encode(), content_type or "application/json"
    elif "data" in obj:
        body, content_type = str(obj["data"]).encode(), content_type or "text/plain; charset=utf-8"
    else:
        body = b""
    raw_headers = obj.get("headers") or {}
    if not isinstance(raw_headers, dict):
        raise UsageError('"headers" must be an object of name: value')
    key = obj.get("id")
    return destination, body, content_type, [(str(k), str(v)) for k, v in raw_headers.items()], str(key) if key else None


def send_lines(
    client: HookahClient,
    lines: Sequence[Tuple[int, str]],
    query_for: Callable[[Destination], List[Tuple[str, str]]],
    extra_headers: Sequence[Tuple[str, str]] = (),
    out: Optional[IO[str]] = None,
    err: Optional[IO[str]] = None,
) -> Tuple[int, int, float]:
    """
    POST each (line number, JSON text) to ``/dispatch``; print each id on
    ``out``. Returns (sent, failed, seconds). Raises ``ClientError`` when the
    server cannot be reached.
    """
    out = out or sys.stdout
    err = err or sys.stderr
    progress = Progress(len(lines), err)
    sent = failed = 0
    for done, (number, text) in enumerate(lines, 1):
        try:
            destination, body, content_type, headers, key = parse_line(text)
            reply = client.call(
                "POST",
                client.path("/dispatch", query_for(destination)),
                body,
                dispatch_headers(content_type, list(extra_headers) + headers, key),
            )
            sent += 1
            out.write(str(reply.get("id", "")) + "\n")
            notice = ignored_notice(reply)
            if notice:
                progress.interrupt(f"line {number}: {notice}")
        except (ServerError, UsageError) as e:
            failed += 1
            progress.interrupt(f"line {number}: {e}")
        except ClientError as e:
            progress.interrupt(f"line {number}: {e}; stopping after {sent} sent")
            out.flush()
            raise
        progress.update(done, failed)
    progress.finish(len(lines), failed)
    out.flush()
    return sent, failed, time.monotonic() - progress.started
