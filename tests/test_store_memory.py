"""``MemoryStore`` held to the ``IStore`` contract, on a deterministic clock."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from hookah.storage.memory import MemoryStore
from tests.storecontract import StoreContractMixin


class MemoryStoreContractTests(StoreContractMixin, TestCase):
    def make_store(self) -> MemoryStore:
        return MemoryStore(Clock())
