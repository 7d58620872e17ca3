"""Ends an embedded Ray cluster whose driver died without shutting it down (SIGKILL, OOM kill).

Ray ends most of a local cluster when its driver's processes go (the raylet and GCS notice), but not
all: the dashboard and runtime-env agents outlive a SIGKILLed driver, orphaned. So a run that starts
its own cluster also starts this watcher (:func:`start_reaper`): it keeps a list of the driver's
descendant processes (polled every ``POLL_S`` seconds) and, once the driver is gone (the pipe it holds
closes: EOF on stdin), kills whichever of them are still alive. A driver that ends normally shuts Ray
down first, so there is then nothing left to kill.

Run as ``python -m rayrl.reaper DRIVER_PID`` with the read end of a pipe the driver keeps as stdin.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time

POLL_S = 1.0
GRACE_S = 3.0  # after the driver is gone: time for Ray's own clean-up before the stragglers are killed


def start_reaper() -> int:
    """Start the watcher for this process; returns the write end of its pipe (kept open, not inherited:
    it closes when this process ends, however it ends)."""
    read_end, write_end = os.pipe()  # both non-inheritable: no Ray process holds the write end
    subprocess.Popen([sys.executable, "-m", "rayrl.reaper", str(os.getpid())], stdin=read_end,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    os.close(read_end)
    return write_end


def _descendants(pid: int) -> dict[int, float]:
    """pid -> create time of every live descendant of ``pid``."""
    import psutil  # ray's dependency

    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return {}
    found = {}
    for child in children:
        try:
            found[child.pid] = child.create_time()
        except psutil.NoSuchProcess:
            continue
    return found


def _alive(pid: int, created: float) -> bool:
    import psutil

    try:
        return psutil.Process(pid).create_time() == created
    except psutil.NoSuchProcess:
        return False


def _kill(processes: dict[int, float]) -> None:
    import psutil

    for pid, created in processes.items():
        try:
            process = psutil.Process(pid)
            if process.create_time() == created and pid != os.getpid():  # not a reused pid
                process.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            continue


def main(driver: int) -> None:
    seen: dict[int, float] = {}
    while True:
        readable, _, _ = select.select([sys.stdin], [], [], POLL_S)
        if readable and not os.read(sys.stdin.fileno(), 1):
            break  # EOF: the driver is gone
        # the current descendants, plus the earlier ones still alive (orphans of a dead parent included);
        # the many short-lived ones (scoring children) drop out
        seen = {pid: created for pid, created in seen.items() if _alive(pid, created)} | _descendants(driver)
    time.sleep(GRACE_S)
    _kill(seen)


if __name__ == "__main__":
    main(int(sys.argv[1]))
