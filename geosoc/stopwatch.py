"""Where a long step's time went: code marks its phases (`phase("fit")`), and whoever wants the breakdown opens a
`collecting()` around the work; with none open a phase costs two clock reads and records nothing.

Phases nest without counting twice: entering an inner phase pauses the outer one, so each second belongs to one
phase. Each phase gets wall seconds and CPU seconds (`time.process_time`: every thread of this process, so a
fit on all cores shows CPU above wall, and a step slowed down by other work on the machine shows wall above CPU).
Collection is per context (a `ContextVar`): phases in other threads are not counted in it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass


@dataclass
class Spent:
    wall: float = 0.0
    cpu: float = 0.0

    def add(self, other: Spent) -> None:
        self.wall += other.wall
        self.cpu += other.cpu


@dataclass
class _Open:
    name: str
    wall: float  # when it last started or resumed
    cpu: float


class _Collection:
    def __init__(self) -> None:
        self.spent: dict[str, Spent] = {}
        self.open: list[_Open] = []

    def pause(self, now: tuple[float, float]) -> None:
        if self.open:
            top = self.open[-1]
            spent = self.spent.setdefault(top.name, Spent())
            spent.wall += now[0] - top.wall
            spent.cpu += now[1] - top.cpu

    def resume(self, now: tuple[float, float]) -> None:
        if self.open:
            self.open[-1].wall, self.open[-1].cpu = now


_current: ContextVar[_Collection | None] = ContextVar("geosoc_stopwatch", default=None)


def _now() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Count the block's time under `name` in the collection open in this context (if any)."""
    collection = _current.get()
    if collection is None:
        yield
        return
    now = _now()
    collection.pause(now)
    collection.open.append(_Open(name, *now))
    try:
        yield
    finally:
        now = _now()
        collection.pause(now)
        collection.open.pop()
        collection.resume(now)


@contextmanager
def collecting(name: str = "other") -> Iterator[dict[str, Spent]]:
    """Collect the phases of the block into the dict it yields (filled as the block runs; complete at its end).
    Time in the block outside any phase goes under `name`."""
    collection = _Collection()
    token = _current.set(collection)
    try:
        with phase(name):
            yield collection.spent
    finally:
        _current.reset(token)
