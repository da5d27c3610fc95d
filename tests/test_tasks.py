"""Ending tasks: a stop is a stop, even when Python 3.11 loses a cancellation."""

from __future__ import annotations

import asyncio
import os
import signal

from firmware_py.tasks import cancel_all, run_stoppable, stop_noted, stop_signals_noted

WAIT_S = 10.0


def stubborn(swallowed: list[int], lost: int = 1):
    """A task body that loses its first `lost` cancellations, as `asyncio.wait_for` does on 3.11 when
    the cancellation lands with the inner result."""
    async def body() -> None:
        while True:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                if len(swallowed) >= lost:
                    raise
                swallowed.append(1)
    return body()


def test_a_stop_ends_a_task_that_swallowed_its_cancellation():
    """A refused connect inside the inverter poll, on a busy board: the stop must cancel again, not wait
    for ever."""
    async def main() -> int:
        swallowed: list[int] = []
        task = asyncio.create_task(stubborn(swallowed))
        await asyncio.sleep(0)
        await asyncio.wait_for(cancel_all([task]), WAIT_S)
        assert task.cancelled()
        return len(swallowed)

    assert asyncio.run(main()) == 1


def test_a_caller_cancelled_while_it_ends_its_parts_ends_them_all_then_its_clean_up_runs():
    """A VEN ends its own parts in a `finally` while the service cancels it again: the second cancellation
    left a part running and skipped the clean-up after it (an HTTP session never closed)."""
    async def main() -> tuple[bool, bool, bool]:
        swallowed: list[int] = []
        cleaned = asyncio.Event()
        parts: list[asyncio.Task[None]] = []

        async def owner() -> None:
            part = asyncio.create_task(stubborn(swallowed, lost=3))
            parts.append(part)
            try:
                await asyncio.Event().wait()
            finally:
                try:
                    await cancel_all([part])
                finally:
                    assert part.done()
                    cleaned.set()

        task = asyncio.create_task(owner())
        await asyncio.sleep(0)
        task.cancel()  # the stop
        await asyncio.sleep(0.01)
        task.cancel()  # ... cancelling again while the owner still ends its part
        await asyncio.wait_for(asyncio.wait({task}), WAIT_S)
        outcome = task.cancelled(), cleaned.is_set(), all(part.done() for part in parts)
        await asyncio.wait_for(cancel_all(parts), WAIT_S)  # what a failure left running ends here
        return outcome

    assert asyncio.run(main()) == (True, True, True)


def test_a_bounded_wait_returns_the_tasks_that_would_not_end_still_cancelled():
    """The service's stop gives its tasks a bound before the safe stop: a task whose clean-up hangs (it
    swallows every cancellation) is returned, not waited for; one that ends is not."""
    async def main() -> tuple[bool, bool, int]:
        released = asyncio.Event()
        cancelled: list[int] = []

        async def hangs_until_released() -> None:
            while not released.is_set():
                try:
                    await released.wait()
                except asyncio.CancelledError:
                    cancelled.append(1)

        hanging = asyncio.create_task(hangs_until_released())
        ending = asyncio.create_task(asyncio.Event().wait())
        await asyncio.sleep(0)
        left = await asyncio.wait_for(cancel_all([hanging, ending], within_s=0.05), WAIT_S)
        outcome = left == {hanging}, ending.cancelled(), len(cancelled)
        released.set()  # the test's own clean-up: let it end
        await asyncio.wait_for(hanging, WAIT_S)
        return outcome

    assert asyncio.run(main()) == (True, True, 1)


def test_an_unbounded_wait_returns_nothing_left():
    async def main() -> set:
        task = asyncio.create_task(asyncio.Event().wait())
        await asyncio.sleep(0)
        return await asyncio.wait_for(cancel_all([task]), WAIT_S)

    assert asyncio.run(main()) == set()


def test_a_stop_signal_noted_while_a_command_starts_is_forgotten_when_it_ends():
    """A signal noted for one command (a `run` that then refused its configuration) stopped the next
    one in the same process (a test's, a tool's) at its first look."""
    before = signal.getsignal(signal.SIGTERM)
    with stop_signals_noted():
        os.kill(os.getpid(), signal.SIGTERM)  # noted, not fatal
        assert stop_noted()
    assert not stop_noted()
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_stop_signal_ends_a_batch_command_whose_work_lost_the_first_cancellation():
    """`sim --realtime` went on for its hours after SIGTERM when the one cancellation asyncio's own Ctrl-C
    handling sends was lost in the run (seen once in a CI's hundreds of runs). It ends as Ctrl-C ends it,
    the handlers before put back."""
    before = signal.getsignal(signal.SIGTERM)
    swallowed: list[int] = []

    async def work() -> str:
        os.kill(os.getpid(), signal.SIGTERM)
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            swallowed.append(1)  # lost, as `asyncio.wait_for` can lose it
        await asyncio.sleep(WAIT_S)
        return "ran to its end"

    try:
        outcome = run_stoppable(work())
    except KeyboardInterrupt:
        outcome = "stopped"
    assert (outcome, swallowed) == ("stopped", [1])
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_batch_command_that_is_not_stopped_returns_its_result():
    async def work() -> int:
        await asyncio.sleep(0)
        return 7

    assert run_stoppable(work()) == 7
