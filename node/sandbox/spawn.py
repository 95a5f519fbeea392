"""Start a sandbox from the trio thread, so that it dies with the daemon and never with a worker thread.

PR_SET_PDEATHSIG (bwrap's --die-with-parent, the tier B launcher's own prctl) fires when the *thread* that forked
the process exits, not when its process does. `trio.lowlevel.open_process` forks in a worker thread (trio 0.35),
and trio retires a worker that stays idle for 10 s: a job was then SIGKILLed about 10 s after it started whenever
its worker thread happened not to be reused in time (under load, as "sandbox-error" with empty stderr). So the
fork happens here, in the thread that runs trio for the daemon's whole life, and the exit is awaited on a pidfd.

The fork blocks the event loop while it runs: CPython uses vfork + exec for these arguments (no preexec_fn, no
uid/gid change), about a millisecond.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from typing import Final, final

import trio

POLL_SECONDS: Final = 0.05  # only where the kernel has no pidfd_open (before Linux 5.3)


@final
class Child:
    """A started sandbox: its pid, its stdout and stderr as trio streams, and an awaitable exit.

    Like `trio.Process` for what the executor needs; `returncode` reaps the process once it has exited, and
    signals are never sent to a reaped pid (so never to an unrelated process that reused it).
    """

    def __init__(
        self, popen: subprocess.Popen[bytes], stdout: trio.lowlevel.FdStream, stderr: trio.lowlevel.FdStream
    ) -> None:
        self._popen = popen
        self.stdout = stdout
        self.stderr = stderr
        self._pidfd: int | None = None
        with contextlib.suppress(OSError, AttributeError):
            self._pidfd = os.pidfd_open(popen.pid)
        self._wait_lock = trio.Lock()

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        """The exit status (negative: the signal that killed it), None while it runs."""
        return self._popen.poll()

    async def wait(self) -> int:
        """Wait until the process has exited; returns its `returncode`. Several tasks may wait at once."""
        async with self._wait_lock:
            while (code := self._popen.poll()) is None:
                if self._pidfd is not None:
                    await trio.lowlevel.wait_readable(self._pidfd)
                else:
                    await trio.sleep(POLL_SECONDS)
        return code

    def send_signal(self, sig: int) -> None:
        self._popen.send_signal(sig)  # a no-op once the process has been reaped

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    async def aclose(self) -> None:
        """Close the output streams and the pidfd (the process itself is left alone)."""
        await self.stdout.aclose()
        await self.stderr.aclose()
        if self._pidfd is not None:
            trio.lowlevel.notify_closing(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None


def spawn(
    argv: Sequence[str], *, pass_fds: Sequence[int], env: Mapping[str, str], cwd: str, start_new_session: bool
) -> Child:
    """Start `argv` with stdin from /dev/null and stdout, stderr piped, forking in the calling (trio) thread.

    Raises:
        OSError: it could not be started (the command is missing, no memory, too many processes).
    """
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        popen = subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=out_w, stderr=err_w, pass_fds=tuple(pass_fds),
            env=dict(env), cwd=cwd, start_new_session=start_new_session,
        )  # fmt: skip
    except BaseException:
        for fd in (out_r, err_r):
            os.close(fd)
        raise
    finally:
        for fd in (out_w, err_w):
            os.close(fd)
    return Child(popen, trio.lowlevel.FdStream(out_r), trio.lowlevel.FdStream(err_r))
