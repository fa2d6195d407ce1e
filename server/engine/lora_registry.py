"""The LoRA adapters an engine serves, by name. Loads read and check an adapter off the engine thread and only then
publish it, so a malformed one changes nothing; the engine thread copies an adapter into a device slot when a step
first needs it (server/model/lora/slots.py).

Unloading takes the name away at once (new requests for it are unknown) and never waits: requests already running
keep the adapter object in their SamplingParams and finish on it; its weights are freed with the last of them."""
from __future__ import annotations

import itertools
import threading

from server.engine.errors import InvalidRequestError
from server.model.lora import AdapterError, LoraAdapter, LoraSlots, read_adapter


class LoraRegistry:
    def __init__(self, slots: LoraSlots | None, shard_sizes=None):
        self.slots, self.shard_sizes = slots, shard_sizes
        self._by_name: dict[str, LoraAdapter] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.slots is not None

    @property
    def max_rank(self) -> int:
        return self.slots.max_rank if self.slots is not None else 0

    def get(self, name: str) -> LoraAdapter | None:
        return self._by_name.get(name)

    def adapters(self) -> list[LoraAdapter]:
        return list(self._by_name.values())

    def load(self, name: str, path: str) -> LoraAdapter:
        """Read, check and publish an adapter; InvalidRequestError (naming `lora_path` or `lora_name`) otherwise."""
        if self.slots is None:
            raise InvalidRequestError("this server serves no LoRA adapters; start it with --enable-lora or --lora",
                                      "lora_name")
        if not name or name in self._by_name:
            raise InvalidRequestError(f"a LoRA adapter named {name!r} is already loaded" if name else
                                      "lora_name must not be empty", "lora_name")
        try:
            adapter = read_adapter(name, path, next(self._ids), self.slots.modules, self.shard_sizes,
                                   self.slots.max_rank, self.slots.dtype)
        except AdapterError as exc:
            raise InvalidRequestError(f"cannot load LoRA adapter {name!r}: {exc}", "lora_path") from None
        with self._lock:
            if name in self._by_name:
                raise InvalidRequestError(f"a LoRA adapter named {name!r} is already loaded", "lora_name")
            self._by_name[name] = adapter
        return adapter

    def unload(self, name: str) -> LoraAdapter | None:
        """Forget `name` (None if no such adapter is loaded); running requests finish on it."""
        with self._lock:
            return self._by_name.pop(name, None)
