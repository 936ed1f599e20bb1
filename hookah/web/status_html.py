"""
The HTML of the status page and its sign-in form: plain functions from a
``Snapshot`` to a string, no template engine and no build step.

Everything that comes from users (topics, URLs, callbacks, errors, ids) goes
through ``html.escape``; the one script and the one stylesheet are inline
and carry the response's CSP nonce, so the page needs no other origin and
runs nothing it did not write itself.
"""

from __future__ import annotations

import datetime
import html
from typing import Any, Dict, List, Optional, Sequence
from urllib.parse import quote

import attr

from hookah import __version__
from hookah.delivery.waiting import describe
from hookah.model import DELIVERED, DELIVERING, FAILED, SCHEDULED, Delivery, Subscription


@attr.s(auto_attribs=True, frozen=True)
class TopicRow:
    topic: str
    events: int
    subscribers: int
    streams: int


@attr.s(auto_attribs=True, frozen=True)
class Snapshot:
    """What the page shows, gathered from storage in one request."""

    now: float
    counts: Dict[str, int]
    topics: Sequence[TopicRow]
    failed: Sequence[Delivery]
    recent: Sequence[Delivery]
    subscriptions: Sequence[Subscription]
    subscription_total: int
    in_flight: int = 0
    # Why each scheduled delivery shown waits (``hookah.delivery.waiting``).
    waiting: Dict[str, Dict[str, Any]] = attr.Factory(dict)

    @property
    def queue_depth(self) -> int:
        return self.counts.get(SCHEDULED, 0) + self.counts.get(DELIVERING, 0)


def e(value: object) -> str:
    return html.escape(str(value), quote=True)


def utc(seconds: Optional[float]) -> str:
    if seconds is None:
        return ""
    when = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    return when.strftime("%Y-%m-%d %H:%M:%SZ")


def relative(seconds: Optional[float], now: float) -> str:
    """``in 3d 4h`` / ``5m ago``: two units are enough to read at a glance."""
    if seconds is None:
        return ""
    delta = seconds - now
    left = abs(int(delta))
    parts: List[str] = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if left >= size or (unit == "s" and not parts):
            parts.append(f"{left // size}{unit}")
            left %= size
        if len(parts) == 2:
            break
    text = " ".join(parts)
    return f"in {text}" if delta > 0 else f"{text} ago"


def _time(seconds: Optional[float], now: float) -> str:
    if seconds is None:
        return '<span class="muted">—</span>'
    return f'<time datetime="{e(utc(seconds))}" title="{e(utc(seconds))}">{e(relative(seconds, now))}</time>'


def _short(text: str, limit: int = 64) -> str:
    shown = text if len(text) <= limit else text[: limit - 1] + "…"
    return f'<span title="{e(text)}">{e(shown)}</span>'


def _badge(status: str) -> str:
    return f'<span class="badge {e(status)}" data-status>{e(status)}</span>'


def _last_result(delivery: Delivery) -> str:
    if not delivery.attempts:
        return '<span class="muted">not tried yet</span>'
    last = delivery.attempts[-1]
    if last.status_code is not None:
        text = f"HTTP {last.status_code}"
        detail = f" {_short(last.error, 48)}" if last.error and last.error != text else ""
        return f'<span class="code">{e(text)}</span>' + detail
    return _short(last.error or "no response", 56)


def _next(delivery: Delivery, now: float, waiting: Optional[Dict[str, Any]] = None) -> str:
    if delivery.status != SCHEDULED or delivery.next_attempt_at is None:
        return ""
    when = relative(delivery.next_attempt_at, now) if delivery.next_attempt_at > now else "now"
    why = describe(waiting)
    if waiting is not None and waiting.get("probe_at") is not None:
        why += f", probe {relative(waiting['probe_at'], now) if waiting['probe_at'] > now else 'now'}"
    reason = f' <span data-waiting="{e(waiting["reason"])}">({e(why)})</span>' if waiting is not None and why else ""
    return f'<div class="sub">next {e(when)}{reason}</div>'


def _delivery_rows(deliveries: Sequence[Delivery], now: float, waiting: Dict[str, Dict[str, Any]]) -> str:
    rows = []
    for d in deliveries:
        target = _short(d.url)
        if d.topic:
            target += f'<div class="sub">topic {_short(d.topic, 56)}</div>'
        resend = ""
        if d.status in (DELIVERED, FAILED):
            resend = (
                f'<form class="resend" method="post" action="/dispatch/{e(quote(d.id, safe=""))}/retry" '
                f'data-id="{e(d.id)}"><button type="submit">Resend</button></form>'
            )
        rows.append(
            f'<tr data-delivery="{e(d.id)}">'
            f'<td><a class="mono" href="/dispatch/{e(quote(d.id, safe=""))}">{e(d.id)}</a>'
            f'<div class="sub">{e(d.kind)}</div></td>'
            f"<td>{_badge(d.status)}</td>"
            f"<td>{target}</td>"
            f'<td class="num" data-attempts>{len(d.attempts)}</td>'
            f"<td data-last>{_last_result(d)}</td>"
            f"<td data-when>{_time(d.attempts[-1].at if d.attempts else d.created_at, now)}{_next(d, now, waiting.get(d.id))}</td>"
            f'<td class="action">{resend}</td>'
            "</tr>"
        )
    return "".join(rows)


def _deliveries_table(
    title: str, anchor: str, deliveries: Sequence[Delivery], now: float, empty: str, more: str,
    waiting: Dict[str, Dict[str, Any]],
) -> str:
    if not deliveries:
        body = f'<p class="empty">{e(empty)}</p>'
    else:
        body = (
            '<div class="scroll"><table><thead><tr><th>Delivery</th><th>Status</th><th>Target</th>'
            '<th class="num">Attempts</th><th>Last result</th><th>Last activity</th><th></th></tr></thead>'
            f"<tbody>{_delivery_rows(deliveries, now, waiting)}</tbody></table></div>"
        )
    return f'<section id="{anchor}"><h2>{e(title)} <a class="more" href="{e(more)}">JSON</a></h2>{body}</section>'


def _topics_table(topics: Sequence[TopicRow]) -> str:
    if not topics:
        return '<p class="empty">No topics yet. Publish with <code>POST /dispatch?_topic=…</code> or subscribe through <code>/hub</code>.</p>'
    rows = "".join(
        f'<tr><td><a href="/topics/{e(quote(t.topic, safe=""))}/events">{_short(t.topic, 80)}</a></td>'
        f'<td class="num">{t.subscribers}</td><td class="num">{t.streams}</td><td class="num">{t.events}</td></tr>'
        for t in topics
    )
    return (
        '<div class="scroll"><table><thead><tr><th>Topic</th><th class="num">Subscribers</th>'
        f'<th class="num">Open streams</th><th class="num">Events kept</th></tr></thead><tbody>{rows}</tbody></table></div>'
    )


def _subscriptions_table(subscriptions: Sequence[Subscription], total: int, now: float) -> str:
    if not subscriptions:
        return '<p class="empty">No WebSub subscriptions.</p>'
    rows = []
    for s in subscriptions:
        expired = s.expires_at <= now
        state = '<span class="badge failed">expired</span>' if expired else '<span class="badge delivered">active</span>'
        rows.append(
            f"<tr><td>{_short(s.topic, 56)}</td><td>{_short(s.callback, 64)}</td><td>{state}</td>"
            f"<td>{_time(s.expires_at, now)}<div class=\"sub\">{e(utc(s.expires_at))}</div></td>"
            f'<td>{"yes" if s.secret is not None else "no"}</td></tr>'
        )
    note = f'<p class="muted">Showing {len(subscriptions)} of {total}.</p>' if total > len(subscriptions) else ""
    return (
        '<div class="scroll"><table><thead><tr><th>Topic</th><th>Callback</th><th>State</th>'
        f'<th>Lease expires</th><th>Signed</th></tr></thead><tbody>{"".join(rows)}</tbody></table></div>{note}'
    )


def _card(label: str, value: object, tone: str = "") -> str:
    return f'<div class="card {tone}"><div class="value">{e(value)}</div><div class="label">{e(label)}</div></div>'


def status_page(snapshot: Snapshot, nonce: str, signed_in: bool) -> str:
    s = snapshot
    streams = sum(t.streams for t in s.topics)
    cards = "".join(
        (
            _card("queue depth", s.queue_depth, "accent"),
            _card("in flight", s.in_flight),
            _card(DELIVERED, s.counts.get(DELIVERED, 0), "ok"),
            _card(FAILED, s.counts.get(FAILED, 0), "bad" if s.counts.get(FAILED) else ""),
            _card("topics", len(s.topics)),
            _card("subscriptions", s.subscription_total),
            _card("stream readers", streams),
        )
    )
    logout = (
        '<form method="post" action="/logout"><button class="link" type="submit">Sign out</button></form>'
        if signed_in
        else ""
    )
    body = (
        f'<header><div class="wrap bar"><h1>Hookah <span class="muted">{e(__version__)}</span></h1>'
        f'<nav><a href="#failed">Failed</a><a href="#recent">Recent</a><a href="#topics">Topics</a>'
        f'<a href="#subscriptions">Subscriptions</a><a href="/metrics">Metrics</a><a href="/healthz">Health</a>'
        f'<a href="/">Refresh</a>{logout}</nav></div></header>'
        f'<main class="wrap"><p class="muted">As of {e(utc(s.now))}</p>'
        f'<div id="notice" role="status" aria-live="polite" hidden></div>'
        f'<div class="cards">{cards}</div>'
        + _deliveries_table("Failed deliveries", "failed", s.failed, s.now, "No failed deliveries.", "/dispatch?status=failed", s.waiting)
        + _deliveries_table("Recent deliveries", "recent", s.recent, s.now, "Nothing dispatched yet.", "/dispatch", s.waiting)
        + f'<section id="topics"><h2>Topics</h2>{_topics_table(s.topics)}</section>'
        + f'<section id="subscriptions"><h2>Subscriptions</h2>{_subscriptions_table(s.subscriptions, s.subscription_total, s.now)}</section>'
        + "</main>"
    )
    return _document("Hookah status", body, nonce, script=SCRIPT)


def login_page(nonce: str, message: Optional[str] = None) -> str:
    error = f'<p class="error" role="alert">{e(message)}</p>' if message else ""
    body = (
        '<main class="wrap narrow"><h1>Hookah</h1><section><h2>Sign in</h2>'
        "<p>This Hookah asks for an admin token. Signing in sets a cookie for this site only, "
        "valid for 12 hours; the token itself goes neither into the cookie nor into the address bar.</p>"
        f"{error}"
        '<form class="login" method="post" action="/login">'
        '<label for="token">Admin token</label>'
        '<input id="token" name="token" type="password" autocomplete="current-password" required autofocus>'
        '<button type="submit">Sign in</button></form></section></main>'
    )
    return _document("Sign in · Hookah", body, nonce)


def _document(title: str, body: str, nonce: str, script: str = "") -> str:
    script_tag = f'<script nonce="{e(nonce)}">{script}</script>' if script else ""
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<link rel="icon" href="data:,"><title>{e(title)}</title>'
        f'<style nonce="{e(nonce)}">{STYLE}</style></head>'
        f"<body>{body}{script_tag}</body></html>"
    )


def content_security_policy(nonce: str) -> str:
    return (
        f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
        "connect-src 'self'; img-src 'self' data:; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    )


STYLE = """
:root{--fg:#1d2330;--muted:#6b7385;--line:#e3e6ee;--bg:#f6f7fb;--card:#fff;--accent:#3b5bdb;
--ok:#2b8a3e;--okbg:#e6f4ea;--bad:#c92a2a;--badbg:#fdecec;--warn:#b25e09;--warnbg:#fff4e0;--info:#1c64b8;--infobg:#e7f0fb}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);background:var(--bg)}
.wrap{max-width:1180px;margin:0 auto;padding:0 20px}.narrow{max-width:440px;padding-top:60px}
header{background:#1d2330;color:#fff}header .bar{display:flex;align-items:center;justify-content:space-between;gap:16px;flex-wrap:wrap;padding:12px 20px}
h1{font-size:20px;margin:0}header .muted{color:#aab1c2;font-weight:400;font-size:13px}
nav{display:flex;gap:14px;align-items:center;flex-wrap:wrap}nav a,nav .link{color:#d7dcea;text-decoration:none;font-size:13px}
nav a:hover,nav .link:hover{color:#fff;text-decoration:underline}
nav form{margin:0}.link{background:none;border:0;padding:0;cursor:pointer;font:inherit}
main{padding-bottom:40px}main>.muted{margin:14px 0 10px}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(140px,1fr));gap:12px;margin-bottom:8px}
.card{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:12px 14px}
.card .value{font-size:26px;font-weight:650;font-variant-numeric:tabular-nums}.card .label{color:var(--muted);font-size:12px;text-transform:uppercase;letter-spacing:.04em}
.card.accent .value{color:var(--accent)}.card.ok .value{color:var(--ok)}.card.bad .value{color:var(--bad)}
section{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:4px 16px 12px;margin-top:18px}
h2{font-size:15px;margin:12px 0 8px;display:flex;align-items:center;gap:10px}h2 .more{font-size:12px;font-weight:400;color:var(--muted)}
.scroll{overflow-x:auto}
table{width:100%;border-collapse:collapse}th,td{text-align:left;padding:7px 8px;border-bottom:1px solid var(--line);vertical-align:top}
th{font-size:12px;color:var(--muted);font-weight:600;text-transform:uppercase;letter-spacing:.03em}
tbody tr:hover{background:#fafbfe}tbody tr:last-child td{border-bottom:0}
.num{text-align:right;font-variant-numeric:tabular-nums}.mono,.code{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:12px}
a{color:var(--accent)}.sub{color:var(--muted);font-size:12px}.muted{color:var(--muted)}.empty{color:var(--muted);margin:6px 0 10px}
.badge{display:inline-block;padding:1px 8px;border-radius:999px;font-size:12px;font-weight:600;background:#eef0f5;color:var(--muted)}
.badge.delivered{background:var(--okbg);color:var(--ok)}.badge.failed{background:var(--badbg);color:var(--bad)}
.badge.scheduled{background:var(--infobg);color:var(--info)}.badge.delivering{background:var(--warnbg);color:var(--warn)}
.action{text-align:right;white-space:nowrap}.action form{margin:0}
button{font:inherit;font-size:13px;border:1px solid var(--accent);background:var(--accent);color:#fff;border-radius:6px;padding:4px 12px;cursor:pointer}
button:hover{filter:brightness(1.08)}button:disabled{opacity:.6;cursor:default}
.action button{background:#fff;color:var(--accent)}.action button:hover{background:var(--infobg)}
#notice{margin:10px 0;padding:9px 12px;border-radius:8px;background:var(--infobg);color:var(--info);border:1px solid #c9dcf3}
#notice.error{background:var(--badbg);color:var(--bad);border-color:#f3c9c9}
.login{display:grid;gap:8px}.login input{font:inherit;padding:8px 10px;border:1px solid var(--line);border-radius:6px}
.login button{justify-self:start;padding:7px 16px}.error{color:var(--bad)}
"""

# Resend without leaving the page: POST the retry, then follow the
# delivery until it settles, updating every row that shows it.
SCRIPT = """
(function(){
  const notice = document.getElementById('notice');
  function say(text, bad){ notice.textContent = text; notice.className = bad ? 'error' : ''; notice.hidden = false; }
  function rows(id){ return document.querySelectorAll('tr[data-delivery="' + CSS.escape(id) + '"]'); }
  function show(id, d){
    rows(id).forEach(function(row){
      const badge = row.querySelector('[data-status]');
      badge.textContent = d.status; badge.className = 'badge ' + d.status;
      if (d.attempts && d.attempts.length) {
        const last = d.attempts[d.attempts.length - 1];
        row.querySelector('[data-attempts]').textContent = d.attempts.length;
        row.querySelector('[data-last]').textContent = last.status_code ? 'HTTP ' + last.status_code : (last.error || '');
        row.querySelector('[data-when]').textContent = 'just now';
      }
      const button = row.querySelector('form.resend button');
      if (button) { button.disabled = !(d.status === 'delivered' || d.status === 'failed'); button.textContent = 'Resend'; }
    });
  }
  async function follow(id){
    for (let i = 0; i < 120; i++) {
      await new Promise(function(r){ setTimeout(r, 500); });
      const r = await fetch('/dispatch/' + encodeURIComponent(id), {headers: {'Accept': 'application/json'}, credentials: 'same-origin'});
      if (!r.ok) { say('Could not follow delivery ' + id + ' (HTTP ' + r.status + ').', true); return; }
      const d = await r.json();
      show(id, d);
      if (d.status === 'delivered' || d.status === 'failed') {
        say('Delivery ' + id + ' ' + d.status + ' after resend. Refresh for the new totals.', d.status === 'failed');
        return;
      }
    }
  }
  document.querySelectorAll('form.resend').forEach(function(form){
    form.addEventListener('submit', async function(event){
      event.preventDefault();
      const id = form.dataset.id;
      rows(id).forEach(function(row){ const b = row.querySelector('form.resend button'); if (b) { b.disabled = true; b.textContent = 'Resending…'; } });
      try {
        const r = await fetch(form.action, {method: 'POST', headers: {'Accept': 'application/json'}, credentials: 'same-origin'});
        const body = await r.json().catch(function(){ return {}; });
        if (!r.ok) {
          say('Resend failed: ' + (body.message || ('HTTP ' + r.status)), true);
          rows(id).forEach(function(row){ const b = row.querySelector('form.resend button'); if (b) { b.disabled = false; b.textContent = 'Resend'; } });
          return;
        }
        show(id, {status: body.status || 'scheduled'});
        say('Delivery ' + id + ' requeued; waiting for the result…', false);
        await follow(id);
      } catch (err) {
        say('Resend failed: ' + err, true);
      }
    });
  });
})();
"""
