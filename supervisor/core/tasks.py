"""Ending the tasks a part of gosup started: one way, used everywhere.

Why not ``task.cancel()`` then ``with suppress(CancelledError): await task``:
when the caller is itself cancelled while it waits (a shutdown closing the
part), the suppress swallows the caller's own cancellation, the caller goes
on as if nothing happened, and whoever waits for it waits forever.
``gather`` keeps the two apart: the tasks' cancellations become results, the
caller's propagates.
"""

from __future__ import annotations

import asyncio
from typing import Any

from loguru import logger


async def cancel_and_wait(
    *tasks: asyncio.Future[Any] | None, expected: tuple[type[Exception], ...] = ()
) -> None:
    """Cancel ``tasks`` (None ones are skipped) and wait until they have ended.

    A task that failed with something other than its cancellation (or one of
    ``expected``) is logged with its traceback; the caller's own cancellation
    is never swallowed.
    """
    live = [t for t in tasks if t is not None]
    for task in live:
        task.cancel()
    if not live:
        return
    results = await asyncio.gather(*live, return_exceptions=True)
    for task, result in zip(live, results, strict=True):
        if isinstance(result, Exception) and not isinstance(result, expected):
            logger.opt(exception=result).error("task {} failed: {}", task, result)
