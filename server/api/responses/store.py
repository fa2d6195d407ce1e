"""The Responses API's store: finished responses kept in memory for `GET /v1/responses/{id}` and
`previous_response_id`, bounded by a count (least recently used out first) and an age (from creation). Each entry
holds the whole conversation up to and including its output, so a continuation never needs an older entry that
may already be gone; entries of one conversation share its item objects, so this costs a list of references."""
from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class StoredResponse:
    response: dict[str, Any]  # the response object, as JSON
    conversation: list[dict[str, Any]]  # input items, earlier turns first, this response's output last
    created: float = 0.0  # the store's clock, set on `put`


@dataclass
class ResponseStore:
    max_entries: int  # 0: nothing is stored
    max_age: float | None  # seconds; None: no age limit
    clock: Callable[[], float] = time.monotonic
    _entries: OrderedDict[str, StoredResponse] = field(default_factory=OrderedDict)

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0

    def __len__(self) -> int:
        self._expire()
        return len(self._entries)

    def put(self, response_id: str, entry: StoredResponse) -> None:
        if not self.enabled:
            return
        entry.created = self.clock()
        self._entries[response_id] = entry
        self._entries.move_to_end(response_id)
        self._expire()
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def get(self, response_id: str) -> StoredResponse | None:
        """The entry, now the most recently used; None when unknown, deleted or expired."""
        self._expire()
        entry = self._entries.get(response_id)
        if entry is not None:
            self._entries.move_to_end(response_id)
        return entry

    def delete(self, response_id: str) -> bool:
        self._expire()
        return self._entries.pop(response_id, None) is not None

    def _expire(self) -> None:
        if self.max_age is None:
            return
        oldest = self.clock() - self.max_age
        for key in [k for k, e in self._entries.items() if e.created <= oldest]:
            del self._entries[key]
