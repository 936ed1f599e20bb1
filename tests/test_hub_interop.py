"""
Interoperability: a WebSub subscriber that nobody here wrote — the one in
``flask-websub`` (PyPI), served by werkzeug in a thread on 127.0.0.1 —
subscribes through Hookah, receives a published update, and unsubscribes.
"""

from __future__ import annotations

import os
import threading
from typing import Any, List, Tuple

from twisted.internet.defer import ensureDeferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.support import listen_sink, start_hookah, temp_dir
from tests.websubsupport import eventually, post_form

try:
    from flask import Flask
    from flask_websub.subscriber import (
        SQLite3SubscriberStorage,
        SQLite3TempSubscriberStorage,
        Subscriber,
    )
    from werkzeug.serving import make_server
except ImportError:  # pragma: no cover - the test dependency is missing
    Flask = None  # type: ignore[assignment,misc]


class FlaskWebSubSubscriber:
    """flask-websub's ``Subscriber`` in a Flask app on a werkzeug thread."""

    def __init__(self, testcase: TestCase) -> None:
        if Flask is None:
            testcase.fail("flask-websub is not installed (pip install '.[test]'): the interop test cannot run")
        self.app = Flask("hookah-interop")
        self.server = make_server("127.0.0.1", 0, self.app, threaded=True)
        self.app.config["SERVER_NAME"] = f"127.0.0.1:{self.server.server_port}"
        # Its databases go to a temporary directory, not the work tree.
        directory = temp_dir(testcase, prefix="hookah-interop-")
        self.subscriber = Subscriber(
            SQLite3SubscriberStorage(os.path.join(directory, "subscriptions.db")),
            SQLite3TempSubscriberStorage(os.path.join(directory, "pending.db")),
            # Its first try at an http hub is over https, which a plain-HTTP
            # hub cannot answer: keep that wait short.
            REQUEST_TIMEOUT=2,
        )
        self.app.register_blueprint(self.subscriber.build_blueprint(url_prefix="/callbacks"))
        self.lock = threading.Lock()
        self.notifications: List[Tuple[str, str, bytes]] = []
        self.successes: List[Tuple[str, str, str]] = []
        self.errors: List[Any] = []
        self.subscriber.add_listener(self._record(self.notifications))
        self.subscriber.add_success_handler(self._record(self.successes))
        self.subscriber.add_error_handler(self._record(self.errors))
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        testcase.addCleanup(lambda: deferToThread(self.server.shutdown))

    def _record(self, into: List[Any]) -> Any:
        def handler(*args: Any) -> None:
            with self.lock:
                into.append(args)

        return handler

    def count(self, what: List[Any]) -> int:
        with self.lock:
            return len(what)

    def _in_app(self, call: Any, **kwargs: Any) -> Any:
        with self.app.app_context():
            return call(**kwargs)

    def subscribe(self, **kwargs: Any) -> Any:
        """Blocking in flask-websub (``requests``): run it off the reactor thread."""
        return deferToThread(self._in_app, self.subscriber.subscribe, **kwargs)

    def unsubscribe(self, callback_id: str) -> Any:
        return deferToThread(self._in_app, self.subscriber.unsubscribe, callback_id=callback_id)


class FlaskWebSubInteropTests(TestCase):
    timeout = 60

    def test_flask_websub_subscriber_receives_update(self) -> Any:
        async def go() -> None:
            service, base = await start_hookah(self)
            hub = base + "/hub"
            topic_sink, topic_base = listen_sink(self)
            topic = topic_base + "/blog/feed.xml"
            feed = b"<?xml version='1.0'?><feed xmlns='http://www.w3.org/2005/Atom'><title>t</title></feed>"
            topic_sink.respond = lambda r: (200, {"Content-Type": "application/atom+xml"}, feed)

            remote = FlaskWebSubSubscriber(self)
            callback_id = await remote.subscribe(topic_url=topic, hub_url=hub, lease_seconds=3600)
            await eventually(lambda: remote.count(remote.successes), what="flask-websub to confirm")
            self.assertEqual(remote.successes[0][1:], (callback_id, "subscribe"))
            self.assertEqual(remote.errors, [])
            # (flask-websub notes a success as it answers; the hub stores after reading that answer)
            [subscription] = await eventually(lambda: service.store.list_subscriptions(topic), what="the subscription")
            self.assertTrue(subscription.callback.endswith(f"/callbacks/{callback_id}"))
            self.assertEqual(subscription.lease_seconds, 3600)

            code, body, _ = await post_form(self, hub, [("hub.mode", "publish"), ("hub.url", topic)])
            self.assertEqual(code, 202, body)
            await eventually(lambda: remote.count(remote.notifications), what="the update at flask-websub")
            self.assertEqual(remote.notifications, [(topic, callback_id, feed)])

            await remote.unsubscribe(callback_id)
            await eventually(lambda: remote.count(remote.successes) == 2, what="the unsubscription")
            self.assertEqual(remote.successes[1][1:], (callback_id, "unsubscribe"))
            await eventually(
                lambda: service.store.list_subscriptions(topic).addCallback(lambda s: s == []),
                what="the subscription to be removed",
            )

        return ensureDeferred(go())
