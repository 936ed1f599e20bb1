"""
The storage seam: everything Hookah must not lose goes through ``IStore``.

Every method returns a Deferred, and a write's Deferred fires only once the
write is durable (for a durable provider): the web layer answers ``202`` on
that signal. The web layer and the dispatcher never know which provider
they run on; one contract suite (``tests/storecontract.py``) holds every
provider to the same behaviour.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface


class StorageUnavailable(Exception):
    """
    The storage cannot be reached now (a database down or restarting). The
    operation was not done; the web layer answers ``503`` with
    ``Retry-After`` and the caller may try again later.
    """


class ClaimLost(LookupError):
    """
    An outcome written with the token of a claim that is no longer held: the
    lease ran out and another deliverer took the delivery over. Nothing was
    written; the other deliverer's attempt stands (this one was a duplicate).
    """


class IStore(Interface):
    def open():  # type: ignore[misc]
        """Make the store usable (create schema, start threads). Deferred[None]."""

    def close():  # type: ignore[misc]
        """Finish pending writes and release resources. Deferred[None]."""

    def ping():  # type: ignore[misc]
        """Round-trip to the storage, for health checks. Deferred[None]."""

    # -- deliveries ---------------------------------------------------------

    def add_deliveries(deliveries):  # type: ignore[misc]
        """
        Store new deliveries atomically, as given (status and claim included,
        so a caller may insert a delivery already claimed by itself).
        Deferred[None], fired when durable.
        """

    def get_delivery(delivery_id):  # type: ignore[misc]
        """Deferred[Optional[Delivery]] with its attempts, oldest first."""

    def list_deliveries(status, limit, after):  # type: ignore[misc]
        """
        A page of deliveries ordered by id ascending, with ids greater than
        ``after`` (or from the start when ``None``), filtered by ``status``
        when it is not ``None``. Deferred[List[Delivery]].
        """

    def claim_due(now, limit, lease_until):  # type: ignore[misc]
        """
        Claim up to ``limit`` deliveries that are due: ``scheduled`` with
        ``next_attempt_at <= now``, or ``delivering`` with an expired claim
        (``claimed_until <= now``: its deliverer died). Earliest first.
        Claimed ones become ``delivering`` with ``claimed_until=lease_until``
        and a fresh ``claim_token`` (different for every claim).
        Deferred[List[Delivery]].
        """

    def finish_attempt(delivery_id, attempt, status, next_attempt_at, follow_ups=(), claim_token=None):  # type: ignore[misc]
        """
        Append ``attempt`` and move the delivery to ``status`` (``scheduled``
        with ``next_attempt_at`` for a retry, or ``delivered``/``failed``),
        releasing its claim and clearing ``deferred``; store the new ``follow_ups`` deliveries (the
        errback or callback report this outcome promises) in the same
        transaction, so no kill can record the outcome and lose its report.
        Deferred[None]; an unknown ``delivery_id`` fails with ``KeyError``
        and stores nothing. With ``claim_token``, only the holder of that
        claim may write: when the delivery's token is another (its lease ran
        out and it was claimed again, or it was released) nothing is stored
        and the Deferred fails with ``ClaimLost``.
        """

    def renew_claims(claims, now, lease_until):  # type: ignore[misc]
        """
        Extend to ``lease_until`` the leases of the ``claims`` (pairs of
        delivery id and claim token) still held: ``delivering`` with that
        token. Deferred[List[str]]: the ids whose claim was lost.
        """

    def release_claims(now):  # type: ignore[misc]
        """
        Make every ``delivering`` delivery ``scheduled`` (keeping its
        ``next_attempt_at``), so it is due at once; and make every
        ``scheduled`` delivery that a host pause pushed back (``deferred ==
        "host_paused"``) due at ``now`` if it was due later, keeping its
        ``deferred`` mark (the dispatcher then probes the host first).
        Called at start-up by the one process that uses a single-node
        store: whoever held those claims is gone, and the pauses were that
        process's view of its hosts, which a restart starts afresh; waiting
        for either would only delay delivery. Deferred[int]: how many
        deliveries were released (claims and pauses).
        """

    def renew_claim(delivery_id, claimed_until):  # type: ignore[misc]
        """
        Move the claim of a ``delivering`` delivery to ``claimed_until``
        (an attempt that lasts longer than the claim it was taken with
        allows, see ``hookah.delivery.lease``). A delivery that is not
        ``delivering`` is left alone. Deferred[None].
        """

    def reschedule(delivery_id, next_attempt_at, deferred=None, claim_token=None):  # type: ignore[misc]
        """
        Put a claimed delivery back to ``scheduled`` without an attempt
        (host paused or busy, service stopping), recording ``deferred``: why
        (``"host_paused"``, ``"host_busy"``, or ``None``). Only a
        ``delivering`` one, and with ``claim_token`` only while that claim
        holds it; otherwise nothing happens. Deferred[None].
        """

    def requeue(delivery_id, now):  # type: ignore[misc]
        """
        Make a finished (``delivered`` or ``failed``) delivery ``scheduled``
        at ``now`` with a fresh retry budget (``retry_from`` = number of
        attempts so far). Deferred[Optional[Delivery]]: the updated delivery,
        or ``None`` when there is no such delivery or it is not finished.
        """

    def next_due():  # type: ignore[misc]
        """
        The earliest time at which some delivery becomes claimable (a
        scheduled one's ``next_attempt_at`` or a claim's expiry), or ``None``.
        Deferred[Optional[float]].
        """

    def cancel_deliveries(topic, callback, reason):  # type: ignore[misc]
        """
        End the WebSub notifications still queued for a subscription that is
        gone (unsubscribed, ``410 Gone``, lease expired): every ``scheduled``
        delivery of kind ``websub`` with this ``topic`` and ``url ==
        callback`` becomes ``failed``, with no next attempt and no claim.

        The reason is recorded where a person inspecting the delivery looks:
        one more ``Attempt`` is appended with ``status_code=None``,
        ``error=reason``, ``duration_ms=0`` and ``at`` the store's clock
        (nothing was sent: that attempt marks the cancellation). No errback
        is sent for it.

        A ``delivering`` delivery is left alone: its attempt is in progress
        and its deliverer records the outcome (the caller cancels again
        after that attempt, see ``hookah.websub.subscriptions``). Finished deliveries and
        deliveries of other kinds are never touched. An index search, never
        a scan of all deliveries. Deferred[int]: how many were cancelled.
        """

    def purge_finished(before, limit):  # type: ignore[misc]
        """
        Delete at most ``limit`` finished (``delivered`` or ``failed``)
        deliveries, with their attempts, whose last activity is strictly
        before ``before``: the time of their last attempt, or ``created_at``
        when they have none. Never a ``scheduled`` or ``delivering`` one.
        Oldest activity first, found through an index (the retention
        service calls it again while a batch comes back full).
        Deferred[int]: how many deliveries were deleted.
        """

    def count_deliveries():  # type: ignore[misc]
        """Deferred[Dict[str, int]]: number of deliveries per status."""

    def find_idempotency_key(key, since):  # type: ignore[misc]
        """
        The id of the delivery or event created with idempotency ``key`` at or
        after time ``since`` (the earliest, when the key was used again after
        an earlier use left the window), or ``None``; ``since=None`` means no
        window. Deferred[Optional[str]].

        Keys are kept apart from the records that carry them: a key (with
        its record's id and ``created_at``) is stored in the same transaction
        as the delivery (``add_deliveries``, ``finish_attempt``'s follow-ups)
        or event (``add_event``) whose ``idempotency_key`` it is, and it
        outlives that record: trimming an event from its topic's history
        (by count or age) or purging a finished delivery forgets no key.
        Keys are forgotten only by age, through ``purge_idempotency_keys``.
        """

    def purge_idempotency_keys(before, limit):  # type: ignore[misc]
        """
        Forget at most ``limit`` idempotency keys recorded with a
        ``created_at`` strictly before ``before``, oldest first, through an
        index (the retention service calls it with ``now -
        --idempotency-window``, again while a batch comes back full).
        Deferred[int]: how many were forgotten.
        """

    # -- events (topic history) ----------------------------------------------

    def add_event(event, deliveries, keep_count, keep_after):  # type: ignore[misc]
        """
        Store ``event`` and its ``deliveries`` (one per subscriber) in one
        transaction, then trim the event's topic history to at most
        ``keep_count`` events and to events created after ``keep_after``.
        Deferred[None], fired when durable.
        """

    def get_event(event_id):  # type: ignore[misc]
        """Deferred[Optional[Event]]."""

    def events_after(topics, after, limit):  # type: ignore[misc]
        """
        Events on any of ``topics`` with id greater than ``after`` (all when
        ``None``), oldest first, at most ``limit``. Deferred[List[Event]].
        """

    def last_events(topics, count):  # type: ignore[misc]
        """
        The newest ``count`` events across ``topics``, returned oldest first.
        Deferred[List[Event]].
        """

    def events_page(topics, after, limit, max_bytes):  # type: ignore[misc]
        """
        As ``events_after``, but the page also ends at the first event that
        brings the bodies returned to ``max_bytes`` or more (so it holds at
        least one event when there is any): what a history reader holds in
        memory is bounded whatever the history holds. Rows are read one at
        a time, never the whole range. Deferred[List[Event]].
        """

    def resume_page(topics, after, limit, max_bytes):  # type: ignore[misc]
        """
        The first page of a resumed stream: ``(kept, page)`` where ``page``
        is ``events_page(topics, after, limit, max_bytes)`` and ``kept``
        tells whether the event ``after`` itself is still in the history of
        one of ``topics``, both read in the same round trip. When it is not
        (trimmed by count or age, or never one of theirs), events between
        it and the oldest kept may be gone, and the reader must be told
        rather than left to believe it missed nothing.
        Deferred[Tuple[bool, List[Event]]].
        """

    def replay_cursor(topics, count):  # type: ignore[misc]
        """
        Where a replay of the newest ``count`` events across ``topics``
        starts: the id of the newest event older than them (to pass as
        ``after``), or ``None`` when the topics hold ``count`` events or
        fewer. Reads ids only. Deferred[Optional[str]].
        """

    def trim_events(before, limit):  # type: ignore[misc]
        """
        Delete at most ``limit`` events, of any topic, created strictly
        before ``before``, oldest first, through an index (``add_event``
        trims only the topic it publishes on; this trims topics that went
        quiet). Deferred[int]: how many were deleted.
        """

    def list_topics():  # type: ignore[misc]
        """
        Deferred[List[Tuple[str, int, int]]]: (topic, events in history,
        active subscriptions) for every topic that has either.
        """

    # -- subscriptions ---------------------------------------------------------

    def put_subscription(subscription):  # type: ignore[misc]
        """
        Create or replace the subscription keyed by (topic, callback): there
        is never more than one per pair. Deferred[None].
        """

    def remove_subscription(topic, callback, cancel_reason=None):  # type: ignore[misc]
        """
        Deferred[bool]: whether one was removed. With ``cancel_reason``, the
        pair's queued notifications are cancelled in the same transaction, as
        ``cancel_deliveries`` does, so no kill can leave a removed
        subscription's retries running.
        """

    def get_subscription(topic, callback):  # type: ignore[misc]
        """Deferred[Optional[Subscription]]."""

    def active_subscriptions(topic, now):  # type: ignore[misc]
        """Subscriptions to ``topic`` whose lease has not expired. Deferred[List[Subscription]]."""

    def list_subscriptions(topic):  # type: ignore[misc]
        """All subscriptions, or those of ``topic`` when not ``None``. Deferred[List[Subscription]]."""

    def purge_expired(now):  # type: ignore[misc]
        """
        Delete subscriptions whose lease ended at or before ``now`` and, in
        the same transaction, cancel their queued notifications as
        ``cancel_deliveries`` does (reason ``model.CANCELLED_EXPIRED``).
        Deferred[List[Tuple[str, str]]]: the (topic, callback) pairs removed.
        """


class ISharedStore(Interface):
    """
    A store that several Hookah nodes share (PostgreSQL): it tells this node
    what the others did, so the node need not poll for it.
    """

    work_listeners = Attribute(
        "List of callables called with no argument when another node made"
        " work due, or when notifications may have been missed (catch up)."
    )
    event_listeners = Attribute(
        "List of callables called with (topic, seq) when events were"
        " committed on a topic by any node (seq: the topic's sequence number"
        " of the first of them), and with (None, None) when notifications may"
        " have been missed (any topic may have new events)."
    )

    def events_since(topic, seq, limit):  # type: ignore[misc]
        """
        Deferred[List[Tuple[int, Event]]]: the events of ``topic`` numbered
        above ``seq`` in the topic's sequence (commit order), at most
        ``limit``, with their numbers.
        """
