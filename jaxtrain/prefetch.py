"""Device prefetch: the next batches are read and copied to the devices while the step runs.

    it = device_prefetch(train_iter, lambda b: mesh_lib.shard_batch(b, mesh), size=2)
    batch = next(it)          # already on the devices, sharded like the step's inputs
    it.get_state()            # the data position *after the batches handed out* (not read)

A background thread reads host batches from the data iterator and puts each on the devices
(``put``: `jaxtrain.mesh.shard_batch`, i.e. ``jax.make_array_from_process_local_data`` per
host), keeping up to ``size`` batches ahead of the one the step consumes (``size=2``: double
buffering; 0 = no thread, read and copy in the caller). The step's time then no longer includes
reading the batch or its host→device copy, as long as the step takes longer than both.

Exact resume: reading ahead moves the data iterator past batches no step has seen. The
iterator's state is therefore recorded after each read (``inner.get_state()``) and travels
with the batch; :meth:`DevicePrefetcher.get_state` returns the state recorded with the last
batch *handed out*, so a checkpoint saves the position of the consumed batch and a resumed run
sees exactly the batches the interrupted one would have. :meth:`set_state` drops what was read
ahead and repositions the iterator.
"""

from __future__ import annotations

import copy
import queue
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

_DONE = object()  # the data iterator is exhausted


class DevicePrefetcher:
    """An iterator over device batches that reads up to `size` batches ahead in a thread.

    The wrapped iterator must have ``get_state()`` / ``set_state()`` (a grain iterator) for
    :meth:`get_state`; the thread is the only one that touches it once started (grain iterators
    are not thread-safe). Errors raised while reading or copying surface at the ``next()`` of
    the batch that failed, with their own traceback.
    """

    def __init__(self, inner: Iterator, put: Callable[[Any], Any], size: int = 2):
        if size < 1:
            raise ValueError(f"DevicePrefetcher: size must be >= 1 (got {size}); use the "
                             "iterator itself for no prefetch.")
        self.inner, self.put, self.size = inner, put, size
        self._state = self._inner_state()  # the position of the last batch handed out
        self._thread: threading.Thread | None = None

    def _inner_state(self) -> Any:
        get = getattr(self.inner, "get_state", None)
        return copy.deepcopy(get()) if get is not None else None

    # ------------------------------------------------------------------ the reader thread

    def _start(self) -> None:
        self._queue: queue.Queue = queue.Queue()
        self._slots = threading.Semaphore(self.size)  # batches read and not yet handed out
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="jaxtrain-device-prefetch",
                                        daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while True:
            self._slots.acquire()
            if self._stop.is_set():
                return
            try:
                host = next(self.inner)
            except StopIteration:
                self._queue.put((_DONE, None, None))
                return
            except BaseException:  # noqa: BLE001 - handed to the consumer, raised there
                self._queue.put((None, None, sys.exc_info()[1]))
                return
            try:
                item = (self.put(host), self._inner_state(), None)
            except BaseException:  # noqa: BLE001
                item = (None, None, sys.exc_info()[1])
            self._queue.put(item)
            if item[2] is not None:
                return

    # ------------------------------------------------------------------ iterator protocol

    def __iter__(self) -> DevicePrefetcher:
        return self

    def __next__(self) -> Any:
        if self._thread is None:
            self._start()
        batch, state, error = self._queue.get()
        if error is not None:
            self.close()
            raise error
        if batch is _DONE:
            self.close()
            raise StopIteration
        self._slots.release()
        self._state = state
        return batch

    def get_state(self) -> Any:
        """The data iterator's state after the last batch handed out by ``next()`` (batches
        read ahead are not counted): what a checkpoint must save."""
        return copy.deepcopy(self._state)

    def set_state(self, state: Any) -> None:
        """Drop the batches read ahead and reposition the data iterator at `state`."""
        self.close()
        self.inner.set_state(state)
        self._state = copy.deepcopy(state)

    def close(self) -> None:
        """Stop the reader thread (batches read ahead are dropped); ``next()`` restarts it at
        the position after the last batch handed out."""
        if self._thread is None:
            return
        self._stop.set()
        self._slots.release()  # wake a reader waiting for a free slot
        while self._thread.is_alive():
            try:  # unblock nothing: the queue is unbounded; drain so memory is freed
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread = None
        if self._state is not None and hasattr(self.inner, "set_state"):
            self.inner.set_state(copy.deepcopy(self._state))  # un-read what was read ahead

    def __del__(self) -> None:  # a dropped prefetcher must not leave its thread reading
        try:
            if self._thread is not None:
                self._stop.set()
                self._slots.release()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def device_prefetch(inner: Iterator, put: Callable[[Any], Any], size: int) -> Iterator:
    """`inner`'s batches passed through `put` (to the devices), read `size` ahead in a thread;
    `size` 0: no thread, ``put(next(inner))`` in the caller (the iterator returned then is a
    plain generator-like wrapper with `inner`'s state). A grain ``DatasetIterator`` is wrapped
    in a subclass of it, so grain's Orbax handler saves :meth:`DevicePrefetcher.get_state` as
    it saves grain's own iterators (the same JSON file)."""
    if size < 0:
        raise ValueError(f"device prefetch size must be >= 0 (got {size}).")
    cls: type = _Unbuffered if size == 0 else DevicePrefetcher
    grain = sys.modules.get("grain")  # never imported here: only an existing grain iterator
    base = getattr(grain, "DatasetIterator", None) if grain is not None else None
    if base is not None and isinstance(inner, base):
        cls = _grain_class(cls, base)
    return cls(inner, put, size)


class _Unbuffered:
    """``put(next(inner))`` in the caller, with `inner`'s state (prefetch off)."""

    def __init__(self, inner: Iterator, put: Callable[[Any], Any], size: int = 0):
        del size
        self.inner, self.put = inner, put

    def __iter__(self) -> _Unbuffered:
        return self

    def __next__(self) -> Any:
        return self.put(next(self.inner))

    def get_state(self) -> Any:
        return self.inner.get_state()

    def set_state(self, state: Any) -> None:
        self.inner.set_state(state)

    def close(self) -> None:
        pass


_GRAIN_CLASSES: dict[type, type] = {}


def _grain_class(cls: type, base: type) -> type:
    """`cls` made a grain ``DatasetIterator`` (for grain's checkpoint handler's isinstance)."""
    if cls not in _GRAIN_CLASSES:

        def __init__(self, inner, put, size):  # noqa: N807
            base.__init__(self)
            cls.__init__(self, inner, put, size)

        _GRAIN_CLASSES[cls] = type(f"Grain{cls.__name__}", (cls, base), {
            "__init__": __init__, "__next__": cls.__next__, "get_state": cls.get_state,
            "set_state": cls.set_state, "close": cls.close, "__iter__": cls.__iter__,
            "start_prefetch": lambda self: None})
    return _GRAIN_CLASSES[cls]
