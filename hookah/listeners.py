"""
How one part hears of another's events, named as interfaces.

Each listener is handed to the part whose events it hears when that part is
built (``hookah.app`` wires them), never appended afterwards, so a part's
constructor lists everything it tells: the core tells ``IEventListener``s
of stored events (live streams), the dispatcher tells
``IDeliveryOutcomeListener``s of finished deliveries (the WebSub hub ends a
subscription whose callback answered ``410``), and the core tells the
dispatcher, an ``IDueDeliveryListener``, of deliveries it made due outside
the claim loop (a manual retry). Several Hookah nodes on one store will add
providers of these (a store's notifications), not new hooks.
"""

from __future__ import annotations

from zope.interface import Interface


class IEventListener(Interface):
    def publish(event):  # type: ignore[misc]
        """
        ``event`` (a ``hookah.model.Event``) is stored in its topic's
        history: pass it on, at once and without waiting. Called in the
        order events were stored; must not raise (an error is logged and
        the other listeners are still told).
        """


class IDeliveryOutcomeListener(Interface):
    def wants(delivery, attempt):  # type: ignore[misc]
        """
        Whether to be told (``delivery_finished``) that ``delivery``, as it
        was before ``attempt``, reached a final state with ``attempt`` as
        its last. Asked first, without side effects: a listener that acts on
        a few outcomes (a ``410`` to a WebSub callback) then costs the
        dispatcher no finished record for every other delivery.
        """

    def delivery_finished(delivery):  # type: ignore[misc]
        """
        ``delivery`` (with its attempts, the last one included) reached a
        final state, ``delivered`` or ``failed``, and that outcome is
        stored. May return a Deferred, which the dispatcher waits for before
        it frees the attempt's slot; must not fail (log instead).
        """


class IDueDeliveryListener(Interface):
    def deliveries_due():  # type: ignore[misc]
        """
        Some delivery in storage became due without its claimer knowing
        (``IStore.requeue`` made a finished one ``scheduled`` now): look for
        due work soon. Many calls in one turn make one look.
        """
