"""A merge pass computed in forked worker processes, one core each (Linux).

Why processes: the chunks of a merge pass are small (a megabyte, to stay in the core's cache), and
every torch op and read of a chunk releases and retakes the interpreter lock; with two threads in
one interpreter the lock changed hands thousands of times a second, and each wake-up of the other
thread cost 10-20 us on a 2-core VM. Forked workers each have their own interpreter: no hand-offs,
and chunks small enough for the cache pay off (docs/benchmarks.md, issue 18).

The parent forks ``workers`` children when the pass starts. They inherit everything the pass needs
(the open checkpoints, read with ``preadv`` at explicit offsets, so shared file descriptors are
safe; the layout; the rule), take jobs from one pipe (whoever is free takes the next: a busy core
slows only its own worker), compute them, copy each result into a slot of a shared memory block and
answer on a second pipe. The parent yields the results in job order, each a view of its slot that
stays valid until the next one is asked for (the writer is done with a chunk by then). A job that
fails in a child is reported, not explained: ``on_failure`` computes it again in the parent, which
raises the real error. The children end when the job pipe closes (also when the parent dies) and
are killed when the pass is abandoned.
"""

from __future__ import annotations

import gc
import mmap
import os
import select
import signal
import struct
import sys
import warnings
from collections import deque
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

JOB = struct.Struct("<5q")  # sequence number, slot, then the caller's job: three integers
DONE = struct.Struct("<3q")  # sequence number, 1 if computed, the bytes the child read for it
POLL_S = 1.0  # how often a waiting parent checks that its workers are alive
DIED = "the merge worker processes ended unexpectedly (killed, or out of memory?)"


class WorkerDied(RuntimeError):
    pass


def can_fork() -> bool:
    """Linux only: macOS's system libraries are not safe to use in a forked child without exec,
    and Windows has no fork (both keep the threads). Nor once this process has used CUDA: a forked
    child cannot, and a state dict to merge may hold CUDA tensors."""
    return sys.platform.startswith("linux") and not torch.cuda.is_initialized()


def forked_map(
    jobs: Iterator[tuple[int, int, int]],
    compute: Callable[[int, int, int], Tensor],
    layout: Callable[[tuple[int, int, int]], tuple[torch.dtype, int]],
    workers: int,
    slot_bytes: int,
    *,
    child_init: Callable[[], Callable[[], int]],
    on_failure: Callable[[tuple[int, int, int]], None],
) -> Iterator[tuple[Tensor, int]]:
    """``compute(*job)`` for every job in forked workers; yields (result, bytes read) in job order.

    ``layout(job)``: the result's dtype and number of elements (at most ``slot_bytes`` bytes).
    ``child_init()`` runs once in each child and returns a function that tells the bytes read since
    it was last called (for the parent's progress bar). ``on_failure(job)`` runs in the parent for a
    job a child could not compute and must raise.
    """
    ahead = 2 * workers  # jobs in flight
    slots = ahead + 1  # and the one the consumer holds
    memory = mmap.mmap(-1, max(1, slots * slot_bytes))  # anonymous and shared: the children write, we read
    buffer = torch.frombuffer(memory, dtype=torch.uint8)[: slots * slot_bytes].view(slots, slot_bytes)
    job_read, job_write = os.pipe()
    done_read, done_write = os.pipe()
    pids: list[int] = []
    froze = False
    try:
        froze = gc.get_freeze_count() == 0  # (the CLI freezes its start-up objects itself)
        if froze:
            gc.freeze()  # the children's collections then skip every inherited object (no copy-on-write)
        for _ in range(workers):
            with warnings.catch_warnings():
                # Python 3.12+ warns of forking with threads running (torch's, a writer's): the
                # children use no lock those threads could hold, and run torch single-threaded
                warnings.simplefilter("ignore", DeprecationWarning)
                pid = os.fork()
            if pid == 0:  # the child: never returns into the parent's stack
                code = 1
                try:
                    os.close(job_write)
                    os.close(done_read)
                    torch.set_num_threads(1)
                    _serve(job_read, done_write, buffer, compute, child_init())
                    code = 0
                finally:
                    os._exit(code)
            pids.append(pid)
        if froze:
            gc.unfreeze()
            froze = False
        os.close(job_read)
        os.close(done_write)
        job_read = done_write = -1
        yield from _collect(jobs, layout, buffer, job_write, done_read, pids, ahead, on_failure)
    finally:
        if froze:
            gc.unfreeze()
        for fd in (job_read, job_write, done_read, done_write):
            if fd >= 0:
                os.close(fd)
        for pid in pids:  # idle children have seen the job pipe close; busy ones are not needed
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):  # already reaped (SIGCHLD ignored)
                pass


def _collect(jobs, layout, buffer, job_write, done_read, pids, ahead, on_failure):
    slots = buffer.shape[0]
    pending: deque[tuple[int, tuple]] = deque()  # (sequence number, job) sent, in order
    finished: dict[int, tuple[int, int]] = {}
    jobs = iter(jobs)
    sequence = 0

    def send_more() -> None:
        nonlocal sequence
        while len(pending) < ahead:
            job = next(jobs, None)
            if job is None:
                return
            try:
                os.write(job_write, JOB.pack(sequence, sequence % slots, *job))
            except BrokenPipeError:  # no worker left to read it
                raise WorkerDied(DIED) from None
            pending.append((sequence, job))
            sequence += 1

    poller = select.poll()  # not select(): it fails on descriptors past 1024 (many open shards)
    poller.register(done_read, select.POLLIN)
    send_more()
    while pending:
        number, job = pending[0]
        while number not in finished:
            got, ok, nread = DONE.unpack(_read_message(done_read, poller, pids))
            finished[got] = ok, nread
        ok, nread = finished.pop(number)
        pending.popleft()
        if not ok:
            on_failure(job)
            raise WorkerDied(f"a merge worker failed on a job the parent then computed: {job}")
        dtype, count = layout(job)
        yield buffer[number % slots, : count * dtype.itemsize].view(dtype), nread
        send_more()  # only now: the slot just yielded is free once the consumer asks for the next


def _read_message(fd: int, poller, pids: list[int]) -> bytes:
    """One DONE message from ``fd`` (registered with ``poller``); raises if a worker died (killed,
    out of memory) instead of waiting forever."""
    data = b""
    while len(data) < DONE.size:
        if not poller.poll(POLL_S * 1000):
            for pid in pids:
                if _ended(pid):
                    pids.remove(pid)
                    raise WorkerDied(DIED)
            continue
        more = os.read(fd, DONE.size - len(data))
        if not more:
            raise WorkerDied(DIED)
        data += more
    return data


def _ended(pid: int) -> bool:
    try:
        return os.waitpid(pid, os.WNOHANG) != (0, 0)
    except ChildProcessError:  # already reaped (SIGCHLD ignored by the host program)
        return True


def _serve(job_read: int, done_write: int, buffer: Tensor, compute, tally: Callable[[], int]) -> None:
    while True:
        message = os.read(job_read, JOB.size)  # whole: the parent writes each job in one write
        if len(message) != JOB.size:
            return  # the pipe closed: the pass is over (or the parent died)
        number, slot, *job = JOB.unpack(message)
        try:
            flat = compute(*job).reshape(-1).view(torch.uint8)
            buffer[slot, : flat.numel()].copy_(flat)
            ok = 1
        except Exception:  # the parent computes the job again and raises its error
            ok = 0
        os.write(done_write, DONE.pack(number, ok, tally()))
