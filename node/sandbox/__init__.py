"""Running strangers' jobs: sandbox tiers, limits, metering and a kill that leaves nothing behind.

Modules:

* `spec`: frozen data: `ExecSpec`, `Limits`, `InputFile`, `ExecResult`, `Termination`, `Usage`, `Tier`.
* `errors`: `AdmissionRefused`, `SandboxUnavailable`, `WorkDirError`.
* `policy`: pure decisions: `admit()` against the node's `Capacity`, `classify()` a finished job.
* `detect`: probing the host (`probe_host() -> HostFacts`) and the pure `choose_tier(facts)`.
* `command`: pure builders of the bwrap / prlimit / setpriv / launcher command lines.
* `seccomp`: the hand-built seccomp-BPF filter (stdlib only). `landlock`: Landlock syscalls (stdlib only).
* `cgroups`: per-job cgroups on v1, v2 or hybrid hierarchies (limits, metering, kill).
* `workdir`: staging inputs, disk usage, digesting outputs without following symlinks.
* `job`: one running job's state (kill, sampling) and the descriptors its start needs.
* `launch_b`: the tier B / unsandboxed launcher script (runs as its own process).
* `executor`: the trio `Executor`: admission, spawn, streaming, enforcement, metering, results.
* `doctor`: `collect_facts()` and `render_report(facts)` for `node doctor`.
"""

from node.sandbox.errors import AdmissionRefused, SandboxUnavailable, WorkDirError
from node.sandbox.spec import ExecResult, ExecSpec, InputFile, Limits, OutputFile, Termination, Tier, Usage

__all__ = [
    "AdmissionRefused",
    "ExecResult",
    "ExecSpec",
    "InputFile",
    "Limits",
    "OutputFile",
    "SandboxUnavailable",
    "Termination",
    "Tier",
    "Usage",
    "WorkDirError",
]
