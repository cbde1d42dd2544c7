"""Server-sent events and merging several async streams into one."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any


async def sse(chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
    """``data: {json}`` events, then ``data: [DONE]``. An error mid-stream becomes an error event."""
    try:
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
    except Exception as e:  # the response has started: the status code cannot change any more
        error = {"error": {"message": str(e) or type(e).__name__, "type": "server_error", "param": None, "code": None}}
        yield f"data: {json.dumps(error)}\n\n"
    yield "data: [DONE]\n\n"


async def merge(streams: list[AsyncIterator[Any]]) -> AsyncIterator[tuple[int, Any]]:
    """Items of several async iterators as they come, tagged with the index of their stream.

    If the consumer stops early, every stream is closed (which aborts their requests)."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index: int, stream: AsyncIterator[Any]) -> None:
        try:
            async for item in stream:
                await queue.put((index, item))
        except BaseException as e:
            await queue.put((index, e))
            raise
        finally:
            await queue.put((index, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            index, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        # A stream may be suspended inside its task (closing it then would raise "already running"): wait until every
        # task has ended, so that each stream is finished, or never started, before it is closed.
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream in streams:
            await stream.aclose()
