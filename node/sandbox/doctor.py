"""`node doctor`: what isolation this host offers, what the node will enforce, and how to fix what is missing.

`collect_facts()` probes (blocking, runs a trial sandbox); `render_report(facts)` is pure text from those facts,
so it is tested on simulated hosts.
"""

from __future__ import annotations

from node.sandbox.detect import FIX_CGROUPS, HostFacts, choose_tier, probe_host
from node.sandbox.spec import Tier


def collect_facts(*, gpus: bool = True) -> HostFacts:
    """Probe this host (blocking: call before trio.run or via trio.to_thread)."""
    return probe_host(gpus=gpus)


def _row(ok: bool | None, name: str, text: str) -> str:
    mark = {True: "ok", False: "--", None: "~~"}[ok]
    return f"  [{mark}] {name:<16} {text}"


def render_report(facts: HostFacts, *, allow_unsandboxed: bool = False) -> str:
    """The doctor's report for `facts`."""
    who = f"root (jobs run as uid {facts.job_uid})" if facts.is_root else f"uid {facts.uid}"
    lines = ["Coop sandbox doctor", f"  host: Linux {facts.kernel} {facts.machine}, running as {who}", "", "Layers"]
    b = facts.bwrap
    if b.path is None:
        lines.append(_row(False, "bubblewrap", "not found"))
    else:
        version = ".".join(map(str, b.version)) if b.version else "unknown version"
        state = f"trial sandbox ran as uid {facts.job_uid}" if b.works else f"trial sandbox failed: {b.error}"
        lines.append(_row(b.works, "bubblewrap", f"{b.path} ({version}): {state}"))
    u = facts.userns
    knobs = ", ".join(
        f"{k}={v}"
        for k, v in (
            ("user.max_user_namespaces", u.max_user_namespaces),
            ("kernel.unprivileged_userns_clone", u.unprivileged_userns_clone),
            ("kernel.apparmor_restrict_unprivileged_userns", u.apparmor_restrict_unprivileged_userns),
        )
        if v is not None
    )
    userns_ok = u.allowed_by_sysctl and (b.works or b.path is None)
    lines.append(_row(userns_ok, "user namespaces", knobs or "no settings found"))
    lines.append(_row(facts.seccomp, "seccomp", "filters available" if facts.seccomp else "unavailable"))
    abi = facts.landlock_abi
    lines.append(_row(abi >= 1, "Landlock", f"ABI {abi}" if abi else "unavailable"))
    cg = facts.cgroups
    parts = []
    if cg.v1_bases:
        parts.append("v1 " + ", ".join(c for c, _ in cg.v1_bases))
    if cg.v2_base:
        ctl = ", ".join(cg.v2_controllers) or "no controllers delegated"
        parts.append(f"v2 {cg.v2_base} ({ctl}{'; cgroup.kill' if cg.v2_kill else ''})")
    usable = cg.usable_controllers()
    cg_text = f"{cg.version}; writable: {'; '.join(parts) or 'none'}"
    lines.append(_row(bool(usable) if "memory" in usable else (None if usable else False), "cgroups", cg_text))
    rl = f"prlimit {facts.prlimit or 'missing'}" + (f", setpriv {facts.setpriv or 'missing'}" if facts.is_root else "")
    rl += " (CPU, file size, open files, processes, core; address space without a memory cgroup)"
    lines.append(_row(facts.prlimit is not None, "rlimits", rl))
    lines.append(_row(bool(facts.gpus) or None, "NVML", facts.nvml))
    for g in facts.gpus:
        lines.append(f"         GPU {g.index}: {g.name} /dev/nvidia{g.minor} {g.uuid}")
    decision = choose_tier(facts, allow_unsandboxed=allow_unsandboxed)
    lines.append("")
    names = {Tier.BWRAP: "A (bubblewrap)", Tier.LANDLOCK: "B (Landlock)", Tier.UNSANDBOXED: "NONE: UNSANDBOXED"}
    lines.append(f"Tier: {names[decision.tier] if decision.tier else 'none: native jobs are refused'}")
    lines.append(f"  {decision.reason}")
    if decision.layers:
        lines.append("Enforced for every job:")
        lines += [f"  - {layer}" for layer in decision.layers]
        lines.append("  - wall-clock timeout, output cap, total CPU and disk checks, cancellation (by the daemon)")
        if "memory" not in usable:
            lines.append("  - memory: RLIMIT_AS only (a job that hits it sees allocation failures)")
    fixes = list(dict.fromkeys(decision.fixes))
    if "memory" not in usable and FIX_CGROUPS not in fixes:
        fixes.append(FIX_CGROUPS)
    if fixes:
        lines.append("To fix:")
        lines += [f"  - {fix}" for fix in fixes]
    return "\n".join(lines) + "\n"
