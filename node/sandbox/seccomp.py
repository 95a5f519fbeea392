"""A seccomp-BPF filter for job processes, built by hand (no libseccomp needed).

Theory of operation: the filter is a classic BPF program over `struct seccomp_data`. It kills the process on a
foreign architecture (x32 or i386 calls on x86_64 included), then walks a flat list of checks:

* `socket`/`socketpair` for any family but AF_UNIX fail with EAFNOSUPPORT (no IP, netlink, packet, vsock...);
* `clone` with any CLONE_NEW* flag and `clone3` (its flags live in memory BPF cannot read) fail; glibc falls
  back from clone3 to clone on ENOSYS;
* `ioctl(TIOCSTI/TIOCLINUX)` fails (terminal input injection);
* a deny list (ptrace, mount family, unshare/setns, bpf, io_uring, perf, keyrings, modules, kexec, ...) fails
  with EPERM;
* everything else is allowed.

The same bytes feed `bwrap --seccomp FD` (tier A) and `install()` in the tier B launcher. This module imports only
the standard library: the tier B launcher loads it by path.
"""

from __future__ import annotations

import ctypes
import errno
import platform
import struct
from typing import Final

# BPF opcodes (linux/filter.h)
_LD_W_ABS: Final = 0x20
_JEQ_K: Final = 0x15
_JGE_K: Final = 0x35
_JSET_K: Final = 0x45
_RET_K: Final = 0x06

RET_KILL_PROCESS: Final = 0x80000000
RET_ALLOW: Final = 0x7FFF0000
_RET_ERRNO: Final = 0x00050000

_OFF_NR: Final = 0
_OFF_ARCH: Final = 4


def _arg_lo(index: int) -> int:
    return 16 + 8 * index  # low 32 bits of args[index] on little-endian machines


_X32_BIT: Final = 0x40000000
AF_UNIX: Final = 1
TIOCSTI: Final = 0x5412
TIOCLINUX: Final = 0x541C
CLONE_NEW_FLAGS: Final = (
    0x00000080  # CLONE_NEWTIME
    | 0x00020000  # CLONE_NEWNS
    | 0x02000000  # CLONE_NEWCGROUP
    | 0x04000000  # CLONE_NEWUTS
    | 0x08000000  # CLONE_NEWIPC
    | 0x10000000  # CLONE_NEWUSER
    | 0x20000000  # CLONE_NEWPID
    | 0x40000000  # CLONE_NEWNET
)

DENIED: Final = (
    "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd",
    "mount", "umount2", "pivot_root", "chroot", "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount",
    "fspick", "mount_setattr", "unshare", "setns", "bpf", "perf_event_open", "userfaultfd",
    "io_uring_setup", "io_uring_enter", "io_uring_register", "keyctl", "add_key", "request_key",
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load",
    "open_by_handle_at", "name_to_handle_at", "swapon", "swapoff", "reboot", "acct", "quotactl",
    "quotactl_fd", "syslog", "lookup_dcookie", "fanotify_init", "vhangup",
    "iopl", "ioperm", "modify_ldt", "uselib",
)  # fmt: skip


class _Arch:
    def __init__(self, audit: int, syscalls: dict[str, int], *, x32: bool) -> None:
        self.audit = audit
        self.syscalls = syscalls
        self.x32 = x32


# Syscall numbers from the kernel's unistd headers; a name missing on an architecture is simply not filtered.
_GENERIC_NEW = {
    "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "open_tree": 428,
    "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "clone3": 435,
    "pidfd_getfd": 438, "mount_setattr": 442, "quotactl_fd": 443,
}  # fmt: skip
ARCHES: Final = {
    "x86_64": _Arch(
        0xC000003E,
        {
            "socket": 41, "socketpair": 53, "clone": 56, "ioctl": 16, "ptrace": 101,
            "process_vm_readv": 310, "process_vm_writev": 311, "mount": 165, "umount2": 166,
            "pivot_root": 155, "chroot": 161, "unshare": 272, "setns": 308, "bpf": 321,
            "perf_event_open": 298, "userfaultfd": 323, "keyctl": 250, "add_key": 248, "request_key": 249,
            "init_module": 175, "finit_module": 313, "delete_module": 176, "kexec_load": 246,
            "kexec_file_load": 320, "open_by_handle_at": 304, "name_to_handle_at": 303, "swapon": 167,
            "swapoff": 168, "reboot": 169, "acct": 163, "quotactl": 179, "syslog": 103,
            "lookup_dcookie": 212, "fanotify_init": 300, "vhangup": 153, "iopl": 172, "ioperm": 173,
            "modify_ldt": 154, "uselib": 134, **_GENERIC_NEW,
        },
        x32=True,
    ),
    "aarch64": _Arch(
        0xC00000B7,
        {
            "socket": 198, "socketpair": 199, "clone": 220, "ioctl": 29, "ptrace": 117,
            "process_vm_readv": 270, "process_vm_writev": 271, "mount": 40, "umount2": 39,
            "pivot_root": 41, "chroot": 51, "unshare": 97, "setns": 268, "bpf": 280,
            "perf_event_open": 241, "userfaultfd": 282, "keyctl": 219, "add_key": 217, "request_key": 218,
            "init_module": 105, "finit_module": 273, "delete_module": 106, "kexec_load": 104,
            "kexec_file_load": 294, "open_by_handle_at": 265, "name_to_handle_at": 264, "swapon": 224,
            "swapoff": 225, "reboot": 142, "acct": 89, "quotactl": 60, "syslog": 116,
            "lookup_dcookie": 18, "fanotify_init": 262, "vhangup": 58, **_GENERIC_NEW,
        },
        x32=False,
    ),
}  # fmt: skip


def _ins(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def _errno(value: int) -> int:
    return _RET_ERRNO | value


def build_filter(machine: str | None = None) -> bytes:
    """The filter program for `machine` (default: this one) as raw `struct sock_filter` bytes.

    Raises:
        ValueError: for an architecture this module has no syscall table for.
    """
    machine = machine or platform.machine()
    arch = ARCHES.get(machine)
    if arch is None:
        raise ValueError(f"no seccomp syscall table for {machine}")
    nr = arch.syscalls
    prog = [
        _ins(_LD_W_ABS, _OFF_ARCH),
        _ins(_JEQ_K, arch.audit, jt=1),
        _ins(_RET_K, RET_KILL_PROCESS),
        _ins(_LD_W_ABS, _OFF_NR),
    ]
    if arch.x32:
        prog += [_ins(_JGE_K, _X32_BIT, jf=1), _ins(_RET_K, RET_KILL_PROCESS)]
    for name in ("socket", "socketpair"):  # A holds nr on entry and on the fall-through path of each block
        prog += [
            _ins(_JEQ_K, nr[name], jf=4),
            _ins(_LD_W_ABS, _arg_lo(0)),
            _ins(_JEQ_K, AF_UNIX, jf=1),
            _ins(_RET_K, RET_ALLOW),
            _ins(_RET_K, _errno(errno.EAFNOSUPPORT)),
        ]
    prog += [
        _ins(_JEQ_K, nr["clone"], jf=4),
        _ins(_LD_W_ABS, _arg_lo(0)),
        _ins(_JSET_K, CLONE_NEW_FLAGS, jf=1),
        _ins(_RET_K, _errno(errno.EPERM)),
        _ins(_RET_K, RET_ALLOW),
        _ins(_JEQ_K, nr["ioctl"], jf=5),
        _ins(_LD_W_ABS, _arg_lo(1)),
        _ins(_JEQ_K, TIOCSTI, jt=1),
        _ins(_JEQ_K, TIOCLINUX, jf=1),
        _ins(_RET_K, _errno(errno.EPERM)),
        _ins(_RET_K, RET_ALLOW),
        _ins(_JEQ_K, nr["clone3"], jf=1),
        _ins(_RET_K, _errno(errno.ENOSYS)),
    ]
    for name in DENIED:
        if name in nr:
            prog += [_ins(_JEQ_K, nr[name], jf=1), _ins(_RET_K, _errno(errno.EPERM))]
    prog.append(_ins(_RET_K, RET_ALLOW))
    return b"".join(prog)


class _SockFprog(ctypes.Structure):
    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))


PR_SET_NO_NEW_PRIVS: Final = 38
PR_SET_SECCOMP: Final = 22
SECCOMP_MODE_FILTER: Final = 2


def install(program: bytes) -> None:
    """Apply `program` to the calling thread and its future children (sets no_new_privs first).

    Raises:
        OSError: if the kernel refuses the filter.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP) failed")
