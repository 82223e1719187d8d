"""Newest wins: per key, at most one waiting item, and a newer one takes its place.

The live path's rule for frames, kept in one place: a session's frame that
waits for the model is replaced by the session's next one, and the replaced
frame's future fails with `Superseded`, so a slow model gets fewer, fresher
frames instead of a backlog.  Snapshots wait here still encoded: newest wins
before the decode (ui.local_renderer decodes the frames a tick takes).  The in-process scheduler (ui.scheduler) and
the Ray lanes (ui.ray_renderer) both keep their waiting frames in a
`Mailbox`.

Keys wait in the order they first put an item: a key whose item is
replaced keeps its place, a key whose item was taken goes to the back with
its next one (`take_turns` serves the first keys in line).

A `Mailbox` does no locking: its owner calls it under the lock that guards
the rest of its state, and fails what it hands back with `supersede` after
letting go of that lock, so that no future's callbacks run under it.
"""

from __future__ import annotations

from collections import OrderedDict
from concurrent.futures import Future
from typing import Generic, Iterable, Protocol, TypeVar

from .renderer import Superseded


class Waiting(Protocol):
    """Whatever waits in a mailbox: something with a future to fail when it is replaced."""

    future: Future


W = TypeVar("W", bound=Waiting)


class Mailbox(Generic[W]):
    """One waiting item per key, in turn order (see the module docstring)."""

    def __init__(self) -> None:
        self._waiting: OrderedDict[str, W] = OrderedDict()

    def __len__(self) -> int:
        return len(self._waiting)

    def keys(self):
        """The keys with an item waiting, in turn order."""
        return self._waiting.keys()

    def put(self, key: str, item: W) -> W | None:
        """Make `item` the key's waiting item; the one it replaces (None: none), for `supersede`."""
        replaced = self._waiting.get(key)
        self._waiting[key] = item  # a key already waiting keeps its place in the turn order
        return replaced

    def take(self, key: str) -> W | None:
        """The key's waiting item, taken out (None: none)."""
        return self._waiting.pop(key, None)

    def take_turns(self, count: int) -> list[tuple[str, W]]:
        """The waiting items of the first `count` keys in line, taken out: (key, item) in turn order."""
        taken = []
        while self._waiting and len(taken) < count:
            taken.append(self._waiting.popitem(last=False))
        return taken

    def clear(self) -> list[W]:
        """Every waiting item, taken out."""
        items = list(self._waiting.values())
        self._waiting.clear()
        return items


def supersede(items: Iterable[Waiting | None], why: str) -> None:
    """Fail each item's future (None: nothing) with `Superseded(why)`; call it outside the owner's lock."""
    for item in items:
        if item is not None:
            item.future.set_exception(Superseded(why))
