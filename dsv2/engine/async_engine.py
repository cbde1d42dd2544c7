"""AsyncEngine: the engine stepping on a background thread, for servers — submit, stream outputs, abort.

Every request in flight shares the same continuous batch. Outputs cross from the engine thread to the asyncio event
loop through each request's queue; a consumer that stops listening (a client that disconnects) aborts its request,
which frees its cache blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from dsv2.engine.data_parallel import DataParallelEngine
from dsv2.engine.engine import LLMEngine, RequestOutput
from dsv2.sampling import SamplingParams

log = logging.getLogger("dsv2.engine")


class EngineDeadError(RuntimeError):
    """The engine thread stopped (an error in a step, or shutdown); requests cannot be served."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class AsyncEngine:
    def __init__(self, engine: LLMEngine | DataParallelEngine) -> None:
        self.engine = engine
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()  # ("add", ...) | ("abort", id) | ("stop",)
        self._streams: dict[str, _Stream] = {}
        self._streams_lock = threading.Lock()
        self._ids = itertools.count()
        self.error: BaseException | None = None
        self._closed = False  # set by the engine thread as it ends, under _streams_lock
        self._thread = threading.Thread(target=self._loop, name="dsv2-engine", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------------------------------------- public API
    async def generate(self, prompt_token_ids: list[int], params: SamplingParams, prompt: str | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield the request's (cumulative) output as steps advance it — the newest one when the consumer reads
        slower than the engine steps; the last one is finished.

        Validation errors (`LLMEngine.check_request`, a ``request_id`` already in flight) raise ValueError before
        anything is queued; a stopped engine raises EngineDeadError.
        """
        self._check_alive()
        self.engine.check_request(prompt_token_ids, params)
        request_id = request_id or f"req-{next(self._ids)}"
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._register(request_id, stream)  # outside the try: a refused request must not abort or unregister another
        self._inbox.put(("add", request_id, prompt_token_ids, params, prompt))
        finished = False
        try:
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, ValueError):
                    raise item
                if isinstance(item, BaseException):
                    raise EngineDeadError(f"the engine failed: {item!r}") from item
                finished = item.finished
                yield item
        finally:
            if not finished:  # the consumer went away (client disconnect, cancellation) or the request failed
                self.abort(request_id)
            with self._streams_lock:
                self._streams.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def stats(self) -> dict[str, int]:
        """A snapshot for metrics (read without stopping the engine: numbers may be one step apart)."""
        return self.engine.stats()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine thread; requests still in flight are aborted and their consumers told so."""
        self._inbox.put(("stop",))
        self._thread.join(timeout)

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def _check_alive(self) -> None:
        if not self.is_alive:
            raise self._dead_error()

    def _dead_error(self) -> EngineDeadError:
        return EngineDeadError(f"the engine is not running ({self.error!r})" if self.error
                               else "the engine is not running")

    def _register(self, request_id: str, stream: _Stream) -> None:
        """Make ``stream`` the receiver of the request's outputs. Under the lock that the engine thread's last act
        (closing) takes too, so that no stream registers after the thread has told every waiter that it stopped."""
        with self._streams_lock:
            if self._closed:
                raise self._dead_error()
            if request_id in self._streams:
                raise ValueError(f"request_id {request_id!r} is already in flight")
            self._streams[request_id] = stream

    # ------------------------------------------------------------------------------------------- engine thread
    def _loop(self) -> None:
        stopping = False
        try:
            while not stopping:
                idle = not self.engine.has_unfinished_requests()
                messages = [self._inbox.get()] if idle else []  # sleep until there is something to do
                while not self._inbox.empty():
                    messages.append(self._inbox.get_nowait())
                for kind, *args in messages:
                    if kind == "add":
                        request_id, ids, params, prompt = args
                        try:
                            self.engine.add_request(request_id, ids, params, prompt)
                        except Exception as e:  # this request's problem: refuse it, keep serving the others
                            if not isinstance(e, ValueError):
                                log.exception("request %s could not be added", request_id)
                            self._deliver(request_id, e if isinstance(e, ValueError) else ValueError(
                                f"the request could not be queued: {e!r}"))
                    elif kind == "abort":
                        self.engine.abort_request(args[0])
                    else:
                        stopping = True
                if not stopping and self.engine.has_unfinished_requests():
                    for output in self.engine.step():
                        self._deliver(output.request_id, output)
            self.error = EngineDeadError("the engine was shut down")
        except BaseException as e:  # a bug or an out-of-memory in a step: fail every consumer loudly
            log.exception("engine thread failed")
            self.error = e
        finally:
            for request_id in list(self.engine.requests):
                self.engine.abort_request(request_id)
            with self._streams_lock:
                self._closed = True
                waiting = list(self._streams)
            for request_id in waiting:
                self._deliver(request_id, self.error)

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        with self._streams_lock:
            stream = self._streams.get(request_id)
        if stream is not None:
            with contextlib.suppress(RuntimeError):  # the consumer's event loop is already closed
                stream.loop.call_soon_threadsafe(_put_latest, stream.queue, item)


def _put_latest(queue: asyncio.Queue, item: RequestOutput | BaseException) -> None:
    """Queue ``item`` in place of what its consumer has not taken yet: outputs are cumulative, so the newest holds
    every older one, and a consumer that stops reading (a stalled client) holds one output, not one per step."""
    while not queue.empty():
        queue.get_nowait()
    queue.put_nowait(item)
