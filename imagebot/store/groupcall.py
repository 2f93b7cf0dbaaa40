"""Group calls: the writes that arrive while one waits for the store's writer go with it.

Under load, many coroutines (and two event loops: the main one and the webhook thread's) ask
for the same kind of short write at once. Each on its own costs a thread hop and a round
trip; the writer is busy anyway, so the ones that arrive while one is queued join it, and the
writer runs them together (the inbox's saves as one INSERT, the send slots' asks as one
SELECT). Under load the group grows with the queue, so the writer keeps up; alone, a call is
one write. Every caller still returns only once its own part is done, with its own result or
error.

The caller that opens a group submits it; the writer closes it to newcomers before it runs
it. A group the writer never ran (store closed, server away) is settled by its submitter.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar, cast

from imagebot.store.db import Conn, Database, hand_back

A = TypeVar("A")
R = TypeVar("R")


@dataclass(slots=True, eq=False)
class Member(Generic[A, R]):
    """One caller's part of a group: what it asked (`arg`) and its answer.

    The answer is kept here (the group's leader reads it once its submit returned) and, for
    every other member, handed to `waiter`, a future of the loop it awaits on (db.hand_back:
    two turns of a busy loop, where a shielded concurrent future took three)."""

    arg: A
    waiter: asyncio.Future[R] | None = None
    loop: asyncio.AbstractEventLoop | None = None
    settled: bool = False
    result: R | None = None
    error: BaseException | None = None

    def settle(self, result: R) -> None:
        if self.settled:  # never twice
            return
        self.settled, self.result = True, result
        if self.waiter is not None and self.loop is not None:
            hand_back(self.loop, self.waiter, result)

    def fail(self, error: BaseException) -> None:
        if self.settled:
            return
        self.settled, self.error = True, error
        if self.waiter is not None and self.loop is not None:
            hand_back(self.loop, self.waiter, error=error)

    def answer(self) -> R:
        if self.error is not None:
            raise self.error
        return cast(R, self.result)


@dataclass(slots=True)
class _Group(Generic[A, R]):
    members: list[Member[A, R]] = field(default_factory=list)
    taken: bool = False  # the writer (or a failed submit) closed it to newcomers


class GroupCall(Generic[A, R]):
    """Run `run(conn, members)` on the writer for every group of calls, in autocommit: each
    of its statements commits on its own (a refused row fails only its own callers).

    `run` settles each member (its result, or its own error) and may raise afterwards so the
    store counts a failed write (/healthz); a member it left unsettled gets that error.
    """

    def __init__(
        self,
        db: Database,
        run: Callable[[Conn, list[Member[A, R]]], None],
        priority: int,
    ) -> None:
        self.db = db
        self._run = run
        self.priority = priority
        # Calls come from any event loop and the writer thread closes the group: a lock, held
        # only to join or to close.
        self._lock = threading.Lock()
        self._open: _Group[A, R] | None = None

    async def call(self, arg: A) -> R:
        """Join the group waiting for the writer, or open one and submit it; this call's
        answer once the writer ran the group."""
        loop = asyncio.get_running_loop()
        with self._lock:
            group = self._open
            leader = group is None
            if group is None:
                group = self._open = _Group()
                member: Member[A, R] = Member(arg)
            else:
                member = Member(arg, loop.create_future(), loop)
            group.members.append(member)
        if not leader:
            # A caller canceled now leaves the group alone (its answer is dropped).
            assert member.waiter is not None
            return await member.waiter
        # Submitted before this coroutine first suspends; once submitted it runs.
        try:
            await self.db.run(lambda conn: self._run_group(conn, group), priority=self.priority)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            # The group never reached the writer: nobody else will settle its members.
            # (When it did, _run_group settled every one already.)
            for other in self._close(group):
                other.fail(exc)
        # Settled by now: by the writer (its submit returned or raised after the run), or
        # just above.
        return member.answer()

    def _close(self, group: _Group[A, R]) -> list[Member[A, R]]:
        """Close `group` to newcomers; its members if this closed it (else none)."""
        with self._lock:
            members = [] if group.taken else group.members
            group.taken = True
            if self._open is group:
                self._open = None
        return members

    def _run_group(self, conn: Conn, group: _Group[A, R]) -> None:
        members = self._close(group)
        try:
            self._run(conn, members)
        except BaseException as exc:
            for member in members:
                member.fail(exc)
            raise
