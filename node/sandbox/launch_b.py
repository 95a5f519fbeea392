"""Tier B (and unsandboxed) launcher: a small trusted parent between the daemon and the job.

Run as `python -I -S launch_b.py CONFIG_FD CMD...` (see `command.launcher_argv`). Theory of operation:

1. It joins the job's cgroups (before anything forks), becomes a child subreaper and dies with the daemon.
2. It forks the job: new session, unprivileged uid (when the daemon is root), rlimits, work dir, then
   Landlock and seccomp, then exec. A close-on-exec pipe tells the parent whether exec happened.
3. It reaps everything. Orphans of the job re-parent to it (subreaper), so when the job's main process ends it
   SIGKILLs and reaps every remaining descendant (the sweep), reports exit status and rusage as JSON on the
   status fd, and exits with the job's status (128 + N for a signal, as bubblewrap does).

Signals from the daemon: SIGTERM is forwarded to every descendant (the grace period); SIGUSR1 sweeps now.
Only the standard library and the sibling modules `landlock` and `seccomp` are imported (by path), so the
launcher starts fast and does not depend on the daemon's packages.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import resource
import signal
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # sibling modules, loaded by path on purpose

import landlock  # type: ignore[import-not-found]
import seccomp  # type: ignore[import-not-found]

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
_libc = ctypes.CDLL(None, use_errno=True)


def _descendants(root: int) -> list[int]:
    found: list[int] = []
    stack = [root]
    while stack:
        pid = stack.pop()
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    kids = [int(x) for x in f.read().split()]
            except OSError:
                continue
            found.extend(kids)
            stack.extend(kids)
    return found


def _signal_all(sig: int) -> int:
    pids = _descendants(os.getpid())
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    return len(pids)


def _child(cfg: dict[str, Any], cmd: list[str], errpipe: int) -> None:
    try:
        os.setsid()
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(sig, signal.SIG_DFL)
        if cfg["uid"] is not None:
            os.setgroups([])
            os.setresgid(cfg["gid"], cfg["gid"], cfg["gid"])
            os.setresuid(cfg["uid"], cfg["uid"], cfg["uid"])
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # after the uid change, which clears it
        if os.getppid() != cfg["launcher_pid"]:
            os._exit(125)
        nproc = cfg["nproc"]
        if nproc is not None:
            # Outside a user namespace RLIMIT_NPROC counts every process of the uid (other jobs', or the
            # daemon user's): allow for the ones that already exist.
            nproc += _count_user_processes(os.getuid())
        for name, soft, hard in cfg["rlimits"]:
            resource.setrlimit(getattr(resource, name), (soft, hard))
        if nproc is not None:
            resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
        os.chdir(cfg["work_dir"])
        if cfg["landlock"]:
            rules = [(p, landlock.READ_EXEC) for p in cfg["read_paths"]]
            rules += [(p, landlock.READ_WRITE_DEV) for p in cfg["device_paths"]]
            rules.append((cfg["work_dir"], landlock.fs_rights(cfg["landlock_abi"])))
            landlock.restrict(rules, abi=cfg["landlock_abi"])
        if cfg["seccomp"]:
            seccomp.install(seccomp.build_filter())
        os.execvpe(cmd[0], cmd, cfg["env"])
    except BaseException as exc:
        code = 127 if isinstance(exc, FileNotFoundError) else 126 if isinstance(exc, PermissionError) else 0
        os.write(errpipe, json.dumps({"code": code, "error": f"{type(exc).__name__}: {exc}"}).encode())
    os._exit(127)


def _count_user_processes(uid: int) -> int:
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                count += os.stat(f"/proc/{entry}").st_uid == uid
    return count


def main() -> int:
    with os.fdopen(int(sys.argv[1]), "rb") as f:  # the config (with the job's env) never shows in argv
        cfg = json.loads(f.read())
    cmd = sys.argv[2:]
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != cfg["parent_pid"]:
        return 125  # the daemon died before we could arm PDEATHSIG
    status_fd = cfg["status_fd"]
    os.set_inheritable(status_fd, False)  # the job must not be able to forge the report
    for path in cfg["cgroup_procs"]:
        with open(path, "w") as procs:
            procs.write(str(os.getpid()))
    _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    sweep_now = False

    def on_term(_sig: int, _frame: object) -> None:
        _signal_all(signal.SIGTERM)

    def on_usr1(_sig: int, _frame: object) -> None:
        nonlocal sweep_now
        sweep_now = True
        _signal_all(signal.SIGKILL)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGUSR1, on_usr1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    cfg["launcher_pid"] = os.getpid()
    r, w = os.pipe2(os.O_CLOEXEC)
    main_pid = os.fork()
    if main_pid == 0:
        os.close(r)
        _child(cfg, cmd, w)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        failure = f.read()
    report: dict[str, object] = {"exec_ok": not failure}
    main_status = None
    if failure:
        err = json.loads(failure)
        report["error"] = err["error"]
        if err["code"]:  # command not found / not executable: the job's problem, like a shell's 127/126
            report["exec_ok"] = True
            sys.stderr.write(f"coop: cannot run {cmd[0]!r}: {err['error']}\n")
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        if pid == main_pid:
            main_status = status
            _signal_all(signal.SIGKILL)  # the sweep: nothing outlives the job's main process
        elif main_status is not None or sweep_now:
            _signal_all(signal.SIGKILL)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    if main_status is None:
        code = 125
    elif os.WIFSIGNALED(main_status):
        code = 128 + os.WTERMSIG(main_status)
    else:
        code = os.WEXITSTATUS(main_status)
    if failure and report["exec_ok"]:
        code = json.loads(failure)["code"]
    report.update(exit_code=code, cpu_seconds=usage.ru_utime + usage.ru_stime, max_rss=usage.ru_maxrss * 1024)
    os.write(status_fd, json.dumps(report).encode())
    return code


if __name__ == "__main__":
    sys.exit(main())
