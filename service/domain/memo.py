"""Memoised computations done once per argument, even when many requests ask at the same time.

`functools.lru_cache` computes a missing value in every thread that asks for it before the first
one has stored it: when a fleet of trainers started at once with the same plan, each request
calibrated σ and computed the plan's PLD figure itself (~30 ms of CPU each, 64 of them sharing
two workers' GILs: the first requests waited ~2 s). `memoised` lets one thread compute a value
while the others asking for the same arguments wait for it, then read it from the cache.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any, Generic, ParamSpec, TypeVar, cast

P = ParamSpec("P")
R = TypeVar("R")


class Memoised(Generic[P, R]):
    """`function` behind an lru_cache of `maxsize`, computed once for concurrent first calls
    with equal arguments (calls with other arguments are not held up)."""

    def __init__(self, function: Callable[P, R], maxsize: int) -> None:
        # Typed Any: lru_cache's wrapper takes hashable arguments, not this function's own.
        self._cached: Any = functools.lru_cache(maxsize=maxsize)(function)
        self._guard = threading.Lock()
        self._flights: dict[object, threading.Lock] = {}
        functools.update_wrapper(self, function)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        key = (args, tuple(sorted(kwargs.items())))
        with self._guard:
            flight = self._flights.setdefault(key, threading.Lock())
        with flight:  # the first caller computes; the others wait, then hit the cache
            try:
                return cast(R, self._cached(*args, **kwargs))
            finally:
                with self._guard:
                    if self._flights.get(key) is flight:
                        del self._flights[key]

    def cache_info(self) -> Any:
        """The lru_cache's statistics."""
        return self._cached.cache_info()

    def cache_clear(self) -> None:
        """Forget every memoised value."""
        self._cached.cache_clear()


def memoised(maxsize: int) -> Callable[[Callable[P, R]], Memoised[P, R]]:
    """Decorator: `Memoised(function, maxsize)`."""

    def wrap(function: Callable[P, R]) -> Memoised[P, R]:
        return Memoised(function, maxsize)

    return wrap
