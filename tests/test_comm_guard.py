"""CommGuard (csrc/comm/comm_guard.h), the protocol between NcclComm's main thread and its
watchdog, over _C._CommGuardProbe: a fake communicator whose "NCCL call" sleeps and whose
"abort" records how many calls were inside it at that moment and what the abort word held.

Timing tolerances: the probe's poller runs every POLL s; SLACK is how late a poll may come on a
loaded CI machine (pytest-xdist workers, one core each) and stays far below the sleeps the tests
tell apart, so a wrong protocol cannot pass within it.
"""
import threading
import time

import pytest

from pyengine import _C

POLL = 0.005
SLACK = 0.25
NEVER = float("inf")


def wait_for(pred, timeout=2.0):
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            return False
        time.sleep(0.001)
    return True


def test_abort_waits_for_the_enqueue_in_progress_then_comes_promptly():
    probe = _C._CommGuardProbe(POLL, NEVER)
    probe.start_enqueue(0.4)
    probe.request_abort("peer died")
    assert probe.abort_requested and probe.aborts == 0  # deferred: a call is inside NCCL
    assert probe.join() == ""  # the call in progress completes
    assert wait_for(lambda: probe.aborts == 1)
    assert probe.inside_at_abort == 0  # never concurrently with the call
    assert 0.0 <= probe.abort_after_leave_s < SLACK  # at the first poll after it left


def test_enqueue_after_an_abort_request_raises_without_reaching_nccl():
    probe = _C._CommGuardProbe(POLL, NEVER)
    probe.enqueue(0.0)
    assert probe.nccl_calls == 1
    probe.request_abort("simulated peer failure")
    assert probe.aborts == 1  # nothing inside NCCL: performed at once
    with pytest.raises(RuntimeError, match="simulated peer failure"):
        probe.enqueue(0.0)
    with pytest.raises(RuntimeError, match="simulated peer failure"):
        probe.check()
    assert probe.nccl_calls == 1


def test_enqueue_raises_while_the_abort_is_still_pending():
    """The reason is recorded at the request: the next enqueue raises at once, without waiting
    for the call in progress (0.4 s) that the abort itself waits for."""
    probe = _C._CommGuardProbe(POLL, NEVER)
    probe.start_enqueue(0.4)
    probe.request_abort("timed out")
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="timed out"):
        probe.enqueue(0.0)
    assert time.monotonic() - start < 0.2  # half the call: scheduling slack, never the wait
    assert probe.aborts == 0 and probe.nccl_calls == 1
    probe.join()


def test_enqueue_waiting_for_the_mutex_raises_once_it_gets_it():
    probe = _C._CommGuardProbe(POLL, NEVER)
    probe.start_enqueue(0.4)
    errors = []

    def second():
        try:
            probe.enqueue(0.0)
        except RuntimeError as exc:
            errors.append(str(exc))

    waiter = threading.Thread(target=second)
    waiter.start()
    time.sleep(0.05)  # the second enqueue is now waiting for the first to leave
    probe.request_abort("peer died")
    waiter.join()
    probe.join()
    assert len(errors) == 1 and "peer died" in errors[0]
    assert probe.nccl_calls == 1


def test_abort_word_is_raised_before_the_abort_runs():
    probe = _C._CommGuardProbe(POLL, NEVER)
    assert probe.abort_word == 0
    probe.start_enqueue(0.2)
    probe.request_abort("peer died")
    assert probe.abort_word == 1 and probe.aborts == 0  # the device sees it while the abort waits
    probe.join()
    assert wait_for(lambda: probe.aborts == 1)
    assert probe.word_at_abort == 1


def test_abort_runs_once_whoever_asks():
    probe = _C._CommGuardProbe(POLL, NEVER)
    probe.request_abort_from_threads(16)
    probe.request_abort("late request")
    for _ in range(5):
        probe.poll()
    time.sleep(10 * POLL)  # and the poller's own polls
    assert probe.aborts == 1
    assert probe.reason.startswith("request ")  # the first request's reason is kept


def test_stuck_enqueue_is_aborted_anyway_after_the_bound():
    bound = 0.2
    probe = _C._CommGuardProbe(POLL, bound)
    probe.start_enqueue(0.6)  # "stuck" well past the bound + SLACK
    probe.request_abort("peer died")
    assert wait_for(lambda: probe.aborts == 1)
    assert probe.inside_at_abort == 1  # concurrently, as documented for this case only
    assert bound <= probe.abort_after_request_s < bound + SLACK
    assert "still inside NCCL" in probe.reason
    probe.join()
    assert probe.aborts == 1


def test_watchdog_queries_only_an_idle_healthy_communicator():
    """ncclCommGetAsyncError goes through try_use: never beside an enqueue, never after an abort."""
    probe = _C._CommGuardProbe(POLL, NEVER)
    assert probe.try_query()
    probe.start_enqueue(0.3)
    assert not probe.try_query()
    probe.join()
    assert probe.try_query()
    probe.request_abort("peer died")
    assert not probe.try_query()
