"""The host's share of a cache pass, off the main thread, so the device never waits for it.

`prepared_in_order` decodes and prepares the next samples on worker threads (PIL decoding, resizing and
the VL processor release the GIL) while the main thread runs the encoders; `BackgroundWriter` writes the
finished files on a thread of its own. Neither changes what is computed: the same functions run, in
the manifest's order, only on other threads.
"""

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any


def prepared_in_order(items: Iterable, prepare: Callable[[Any], Any], workers: int, ahead: int | None = None) -> Iterator:
    """`prepare(item)` for each item, in order, computed up to `ahead` items early on `workers` threads.

    `workers` 0 prepares each item in the calling thread when it is asked for (one at a time). An
    exception raised by `prepare` is raised here, at its item.
    """
    if workers <= 0:
        for item in items:
            yield prepare(item)
        return
    ahead = max(ahead or 2 * workers, 1)
    pool = ThreadPoolExecutor(workers, thread_name_prefix="qwen-edit-cache-prepare")
    try:
        pending = deque()
        iterator = iter(items)
        for item in iterator:
            pending.append(pool.submit(prepare, item))
            if len(pending) >= ahead:
                break
        while pending:
            result = pending.popleft().result()
            following = next(iterator, _END)
            if following is not _END:
                pending.append(pool.submit(prepare, following))
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # a consumer that stops early leaves no thread running


_END = object()


class BackgroundWriter:
    """Calls `write(*args)` for each `put(*args)` on one thread, in order; at most `depth` wait in line.

    The first error of a write is raised in the caller at its next `put` or at `close` (later writes are
    skipped); `close` waits until everything put before it is written.
    """

    def __init__(self, write: Callable[..., None], depth: int = 8):
        self._write = write
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None  # stays set: once a write failed, the later ones are skipped
        self._reported = False
        self._thread = threading.Thread(target=self._run, name="qwen-edit-cache-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._write(*job)
                except BaseException as error:  # noqa: BLE001 - handed to the caller's thread
                    self._error = error

    def put(self, *args) -> None:
        self._raise_error()
        self._queue.put(args)

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._raise_error()

    def _raise_error(self) -> None:
        if self._error is not None and not self._reported:
            self._reported = True
            raise self._error

    def __enter__(self) -> "BackgroundWriter":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.close()
            return
        try:  # the pass failed: what was put is still written, and the pass's own error is the one raised
            self.close()
        except BaseException:  # noqa: BLE001
            pass
