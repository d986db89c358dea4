"""Clean shutdown on SIGTERM / SIGINT: the task subprocesses stop with the server, and it does not hang.

MONAI Label 0.8.5 runs training, scoring and batch inference as ``python -m monailabel.interfaces.utils.app``
subprocesses (``monailabel.utils.async_tasks.utils.run_background_task``) and never stops them when the
server exits: after ``kill -TERM <server>`` a training run went on and published new weights 97 s after the
server had gone. uvicorn's own shutdown then waits, without a limit, for running requests (64 s for a long
click) and, at interpreter exit, for the threads that read the subprocesses' output.

:func:`install_clean_shutdown` chains a handler in front of uvicorn's for SIGTERM and SIGINT that

1. terminates every task subprocess MONAI Label started, with its children (SIGTERM, then SIGKILL after
   :data:`KILL_AFTER_S`), and removes the temporary files an interrupted atomic save may leave in the model
   folder (``sam_med3d.checkpoint.atomic_torch_save`` writes ``.<name>.*.tmp`` and renames: the published
   weights are always a complete file, old or new);
2. lets uvicorn stop as usual (no new connections, running requests may finish) for at most ``grace_s``
   seconds, then tells it to stop waiting (``force_exit``);
3. ends the process after ``hard_exit_s`` if anything still holds it.

Install once, in the server process (``MONAILabelApp.on_init_complete``, which runs after uvicorn installed
its handlers). A server killed outright (SIGKILL, a crash) runs no handler: :func:`exit_with_parent`, called
in every task subprocess, covers that case.

What would let us delete it: MONAI Label stopping its task subprocesses when the server stops, with a bounded
wait for requests.
"""

from __future__ import annotations

import glob
import logging
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, List, Optional, Sequence

logger = logging.getLogger(__name__)

#: Seconds running requests get after SIGTERM before uvicorn stops waiting for them.
GRACE_S = 3.0
#: Seconds after SIGTERM at which the process exits whatever still runs.
HARD_EXIT_S = 15.0
#: Seconds a task subprocess gets between SIGTERM and SIGKILL.
KILL_AFTER_S = 3.0


def task_processes() -> List[Any]:
    """The ``subprocess.Popen`` of every task (train, scoring, batch_infer) MONAI Label is running now."""
    from monailabel.utils.async_tasks.utils import background_processes

    return [process for by_id in list(background_processes.values()) for process in list(by_id.values())]


def stop_task_processes(kill_after_s: float = KILL_AFTER_S) -> List[int]:
    """Terminate every task subprocess and its children; SIGKILL what is left after ``kill_after_s``.

    Returns the pids that were signalled.
    """
    import psutil

    targets = []
    for process in task_processes():
        try:
            parent = psutil.Process(process.pid)
            targets += parent.children(recursive=True) + [parent]
        except psutil.NoSuchProcess:
            continue
    for proc in targets:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(targets, timeout=kill_after_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=kill_after_s)
    if targets:
        logger.warning("Shutdown: stopped %d task process(es): %s", len(targets), [p.pid for p in targets])
    return [p.pid for p in targets]


def remove_partial_saves(folders: Sequence[str], when: str = "Shutdown") -> List[str]:
    """Delete the ``.<name>.*.tmp`` files an interrupted atomic save left in ``folders`` (not recursive).
    ``when`` names the moment in the log line (the server calls this at start and at shutdown)."""
    removed = []
    for folder in folders:
        for path in glob.glob(os.path.join(glob.escape(folder), ".*.tmp")):
            try:
                os.unlink(path)
                removed.append(path)
            except OSError:
                pass
    if removed:
        logger.warning("%s: removed partial save(s) %s", when, removed)
    return removed


def install_clean_shutdown(model_folders: Sequence[str] = (), grace_s: float = GRACE_S,
                           hard_exit_s: float = HARD_EXIT_S,
                           exit_process: Callable[[int], None] = os._exit) -> None:
    """Chain the shutdown sequence (module docstring) in front of the current SIGTERM and SIGINT handlers.

    Args:
        model_folders: folders where training publishes weights (partial saves are removed from them).
        grace_s: how long running requests may take after the signal.
        hard_exit_s: when the process exits regardless (``exit_process(0)``).
    """
    if threading.current_thread() is not threading.main_thread():
        logger.warning("Clean shutdown not installed: signal handlers can only be set from the main thread")
        return
    started = threading.Event()

    def sequence(server: Optional[Any]) -> None:
        begin = time.monotonic()
        stop_task_processes()
        remove_partial_saves(model_folders)
        time.sleep(max(0.0, grace_s - (time.monotonic() - begin)))
        if server is not None and hasattr(server, "force_exit"):
            server.force_exit = True  # uvicorn: stop waiting for open connections and running requests
        stop_task_processes()  # one started during the grace period
        time.sleep(max(0.0, hard_exit_s - (time.monotonic() - begin)))
        logger.error("Shutdown: still running %.0f s after the signal; exiting now", hard_exit_s)
        exit_process(0)

    for signum in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(signum)
        if getattr(previous, "clean_shutdown", False):
            continue  # already installed

        def handler(sig: int, frame: Any, previous: Any = previous) -> None:
            if not started.is_set():
                started.set()
                logger.warning("Shutdown (%s): stopping task subprocesses; requests get %.0f s", signal.Signals(sig).name,
                               grace_s)
                threading.Thread(target=sequence, args=(getattr(previous, "__self__", None),),
                                 name="clean-shutdown", daemon=True).start()
            if callable(previous):
                previous(sig, frame)
            elif previous == signal.SIG_DFL:
                raise SystemExit(128 + sig)

        handler.clean_shutdown = True
        signal.signal(signum, handler)
    logger.info("Clean shutdown installed: SIGTERM stops task subprocesses, requests get %.0f s, exit within %.0f s",
                grace_s, hard_exit_s)


# ------------------------------------------------------------------------------------- server killed outright
#: The module MONAI Label runs its task subprocesses as (``python -m monailabel.interfaces.utils.app``).
TASK_MODULE = "monailabel.interfaces.utils.app"
#: Logged by a task subprocess once it is bound to the server's life (tests wait for it).
ARMED_MESSAGE = "Exit with parent armed"
#: Linux ``prctl`` option: the signal a process receives when its parent dies.
_PR_SET_PDEATHSIG = 1


def is_task_subprocess() -> bool:
    """Whether this process is one of MONAI Label's task subprocesses (training, scoring, batch infer)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return getattr(spec, "name", None) == TASK_MODULE


def exit_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Have Linux send ``sig`` to this process when its parent (the server) dies, ``kill -9`` included.

    A SIGTERM handler cannot run when the server is killed with SIGKILL or crashes, so without this its
    training subprocess would go on and publish weights for a server that no longer exists. The kernel sends
    the signal when the parent *thread* that started this process ends; MONAI Label starts task subprocesses
    from a worker thread that waits for them to finish, so that is the server's end. Returns False
    where the kernel offers no such call (not Linux); the handler above still covers SIGTERM/SIGINT there.
    """
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        logger.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d): this task outlives a killed server",
                       ctypes.get_errno())
        return False
    if parent == 1 or not _alive(parent):  # the parent died before the call: nobody will signal
        os.kill(os.getpid(), sig)
    logger.info("%s: this task stops when the server (pid %d) exits", ARMED_MESSAGE, parent)
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
