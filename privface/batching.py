"""Grouping a request stream into batches without waiting for a batch to fill.

A reader thread pulls requests off the stream while the previous group is being processed,
so a group is whatever arrived meanwhile (at least one, at most ``max_items``): a fast
client gets large batches, a slow one is never held back waiting for more.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

_END = object()


def groups(items: Iterable[T], max_items: int, prefetch: int | None = None) -> Iterator[list[T]]:
    """Yield lists of the items available so far; errors of ``items`` are re-raised here."""
    if max_items < 1:
        raise ValueError("max_items must be positive")
    buffer: queue.Queue = queue.Queue(maxsize=prefetch or 2 * max_items)
    stop = threading.Event()

    def read() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                buffer.put(item)
            buffer.put(_END)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            buffer.put(exc)

    reader = threading.Thread(target=read, name="privface-stream-reader", daemon=True)
    reader.start()
    try:
        done = False
        while not done:
            group: list[T] = []
            item = buffer.get()
            while True:
                if item is _END:
                    done = True
                    break
                if isinstance(item, BaseException):
                    if group:
                        yield group
                    raise item
                group.append(item)
                if len(group) >= max_items:
                    break
                try:
                    item = buffer.get_nowait()
                except queue.Empty:
                    break
            if group:
                yield group
    finally:
        # Free a reader blocked on a full buffer; it stops at its next item. One blocked on
        # the stream itself (a client that neither sends nor closes) is not waited for.
        stop.set()
        while True:
            try:
                buffer.get_nowait()
            except queue.Empty:
                break
