"""``--nproc N``: one command as N processes of one torch.distributed group on this machine.

What ``torchrun --standalone`` gives its processes (RANK, LOCAL_RANK, WORLD_SIZE, the address of a
store this process holds), without torchrun's agent: when a process fails, the agent prints a
traceback and a report of its own and exits 1 whatever the failure was, and every process prints
the same error. Here a process hands its one-line error to this one (``say``: a file per rank in
``$MERGECL_LAUNCH_ERRORS``), which prints each distinct line once, stops the other processes (they
would wait for the failed one in their next collective) and exits as the first failed process did:
1 when a method failed, 2 for an error. A process that crashes hands over its traceback
(``hand_over``); only the first crash's is printed: the others' are mostly the same one, or the
collectives that lost it. A process a signal ended (the out-of-memory killer) is the cause of the
others' failures: it alone is named, and its status is the launch's.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ERRORS = "MERGECL_LAUNCH_ERRORS"  # the folder where this launch's processes leave their error lines
STORE = "MERGECL_LAUNCH_STORE"  # host:port of the store the launching process holds
POLL_S = 0.05
GRACE_S = 3.0  # after one process failed: time for the others to end on their own (the same error)
STOP_S = 5.0  # after SIGTERM: time before SIGKILL
FOLDER = "mergecl-launch-"  # + the launcher's pid + "-" + random: its errors folder, in the temp dir
LEFT = re.compile(r"rank\d+(\.traceback)?")  # what the processes leave there


def launched() -> bool:
    """Whether this process is one that ``launch`` started."""
    return bool(os.environ.get(ERRORS))


def hand_over(traceback_text: str) -> None:
    """In a process ``launch`` started: leave the traceback of a crash to the launcher."""
    _leave(f"rank{os.environ.get('RANK', '0')}.traceback", traceback_text)


def _leave(name: str, text: str) -> bool:
    try:
        with open(Path(os.environ[ERRORS]) / name, "a", encoding="utf-8") as handle:
            handle.write(text)
        return True
    except (KeyError, OSError):  # not launched, or the launcher is gone
        return False


def say(line: str) -> None:
    """Print ``line`` (a process's last word, e.g. ``mergecl: error: ...``) on stderr; in a process
    ``launch`` started, hand it to the launcher instead, which prints it once for all processes."""
    if not (launched() and _leave(f"rank{os.environ.get('RANK', '0')}", line + "\n")):
        print(line, file=sys.stderr, flush=True)


def launch(command: list[str], processes: int, env: dict[str, str]) -> int:
    """Run ``command`` as ``processes`` processes (ranks 0..N-1) with ``env``; wait for them; return
    the exit status: 0, or the first failed process's (in the order they failed)."""
    import torch.distributed as dist

    # the store the processes meet at: bound here, on a free port, so no two launches race for one
    store = dist.TCPStore("127.0.0.1", 0, processes, is_master=True, wait_for_workers=False)
    _tidy_after_killed_launches()
    with tempfile.TemporaryDirectory(prefix=f"{FOLDER}{os.getpid()}-") as errors:
        shared = {
            **env,
            "WORLD_SIZE": str(processes),
            "LOCAL_WORLD_SIZE": str(processes),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(store.port),
            STORE: f"127.0.0.1:{store.port}",
            ERRORS: errors,
        }
        children = []
        try:
            for rank in range(processes):
                children.append(subprocess.Popen(command, env={**shared, "RANK": str(rank), "LOCAL_RANK": str(rank)}))
            failed = _wait(children)
        except KeyboardInterrupt:  # from a terminal, Ctrl-C reached the processes too: they end
            _end(children, GRACE_S)
            raise
        failed.sort(key=lambda item: item[1] >= 0)  # a signal-ended process first: the cause
        for line in _lines(Path(errors), processes, failed):
            print(line, file=sys.stderr, flush=True)
    return _status(failed[0][1]) if failed else 0


def _tidy_after_killed_launches() -> None:
    """Remove the errors folders of launchers that were killed (SIGKILL leaves no time to tidy):
    this user's, named for a process that no longer runs, holding only what processes leave
    (``rank<N>`` and ``rank<N>.traceback`` files). Anything else is left alone."""
    for folder in Path(tempfile.gettempdir()).glob(f"{FOLDER}*-*"):
        pid = folder.name[len(FOLDER) :].split("-", 1)[0]
        try:
            if not pid.isdigit() or folder.is_symlink() or folder.stat().st_uid != os.getuid() or _alive(int(pid)):
                continue
            files = list(folder.iterdir())
            if all(LEFT.fullmatch(f.name) and f.is_file() and not f.is_symlink() for f in files):
                for f in files:
                    f.unlink()
                folder.rmdir()
        except OSError:  # another launch tidying at once, or a folder that is not ours to read
            continue


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        pass
    return True


def _wait(children: list[subprocess.Popen]) -> list[tuple[int, int]]:
    """Wait for every child; once one has failed, end the others (``_end``). Returns the (rank,
    status) of those that failed on their own, in the order they did."""
    while True:
        failed = [(rank, child.returncode) for rank, child in enumerate(children) if child.poll() not in (None, 0)]
        if failed or all(child.returncode is not None for child in children):
            break
        time.sleep(POLL_S)
    if failed:
        _end(children, GRACE_S)
        failed += [(rank, child.returncode) for rank, child in enumerate(children) if child.returncode > 0]
    return list(dict.fromkeys(failed))


def _end(children: list[subprocess.Popen], grace_s: float) -> None:
    """Give the children still running ``grace_s`` to end, then SIGTERM, then after ``STOP_S`` SIGKILL."""
    for stop, wait_s in ((None, grace_s), (subprocess.Popen.terminate, STOP_S), (subprocess.Popen.kill, None)):
        for child in children:
            if stop is not None and child.poll() is None:
                stop(child)
        deadline = time.monotonic() + (wait_s or 0.0)
        for child in children:
            try:
                child.wait(timeout=None if wait_s is None else max(deadline - time.monotonic(), 0.0))
            except subprocess.TimeoutExpired:
                pass


def _lines(errors: Path, processes: int, failed: list[tuple[int, int]]) -> list[str]:
    """What to print: for a process a signal ended (another process's or the system's), that alone;
    else the first failed process's traceback, if it crashed, then what the processes said, each
    distinct line once, in rank order."""
    ended = [(rank, _signal_name(-status)) for rank, status in failed if status < 0]
    if ended:
        return [f"mergecl: error: the process of rank {rank} was ended by {name}" for rank, name in ended]
    lines: list[str] = []
    crash = errors / f"rank{failed[0][0]}.traceback" if failed else None
    if crash is not None and crash.exists():
        lines.append(crash.read_text(encoding="utf-8").rstrip("\n"))
    for rank in range(processes):
        path = errors / f"rank{rank}"
        said = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
        lines += [line for line in said if line not in lines]
    return lines


def _status(returncode: int) -> int:
    """A shell's exit status for a child's return code (-N: ended by signal N, i.e. 128 + N)."""
    return 128 - returncode if returncode < 0 else returncode


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:  # a real-time signal has no name of its own
        return f"signal {number}"
