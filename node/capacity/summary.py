"""Pure summaries of raw capacity probe data (no psutil, no pynvml, no clock).

Theory of operation: ``probe.probe_raw`` records what psutil and NVML said as a plain JSON-able dict
(the *raw* form, kept close to the tools' own fields so fixtures can be recorded on real machines).
``summarise`` validates that dict and turns it into a ``MachineCapacity``; everything derived from it
(resource classes, model matching) is computed here from the summary alone.

Raw form (``schema`` 1)::

    {"schema": 1, "cpus": int, "memory": {"total": int, "available": int},
     "disk": {"path": str, "total": int, "free": int}, "loadavg": [float, float, float],
     "gpu": {"available": false, "reason": str}
         | {"available": true, "devices": [{"index": int, "name": str, "memory_total": int,
                                            "memory_used": int, "utilization_gpu": int | null, "uuid": str}]}}
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, final

RAW_SCHEMA: Final = 1
GIB: Final = 1 << 30
# Memory tiers for provider hints, in GiB. A machine gets the largest tier not above its total memory.
MEMORY_TIERS_GIB: Final = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
MAX_LOAD_PERMILLE: Final = 10_000


class ProbeDataError(ValueError):
    """Raw probe data is malformed (missing keys, wrong types, impossible values).

    The fault of whoever produced the data: a broken probe, or a hand-edited or corrupt fixture.
    """


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class GpuDevice:
    """One GPU as NVML reports it."""

    index: int
    model: str
    memory_bytes: int
    memory_used_bytes: int
    utilization_percent: int
    uuid: str


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class MachineCapacity:
    """What a machine has, summarised from one probe.

    Attributes:
        load_permille: 1-minute load average per CPU, times 1000, clamped to 0..10000.
        gpu_status: human-readable, e.g. ``"2 GPUs: NVIDIA A100-SXM4-40GB x2"`` or
            ``"no GPU (NVML not available: <reason>)"``.
    """

    cpus: int
    memory_bytes: int
    memory_available_bytes: int
    disk_bytes: int
    disk_free_bytes: int
    load_permille: int
    gpus: tuple[GpuDevice, ...]
    gpu_status: str


def summarise(raw: Mapping[str, object]) -> MachineCapacity:
    """Validate raw probe data and summarise it.

    Args:
        raw: the dict from ``probe.probe_raw`` or a JSON fixture (see the module docstring for its form).

    Returns:
        The summary.

    Raises:
        ProbeDataError: ``raw`` is malformed; the message names the offending field.
    """
    schema = _field(raw, "schema", "raw")
    if schema != RAW_SCHEMA:
        raise ProbeDataError(f"raw.schema: unsupported schema {schema!r}, expected {RAW_SCHEMA}")
    cpus = _int(raw, "cpus", "raw", minimum=1)
    memory = _mapping(raw, "memory", "raw")
    memory_bytes = _int(memory, "total", "raw.memory")
    memory_available = _int(memory, "available", "raw.memory", maximum=memory_bytes)
    disk = _mapping(raw, "disk", "raw")
    disk_bytes = _int(disk, "total", "raw.disk")
    disk_free = _int(disk, "free", "raw.disk", maximum=disk_bytes)
    loadavg = _field(raw, "loadavg", "raw")
    if not isinstance(loadavg, list) or len(loadavg) != 3 or not all(_is_load(x) for x in loadavg):
        raise ProbeDataError(f"raw.loadavg: expected 3 finite non-negative numbers, got {loadavg!r}")
    permille = min(MAX_LOAD_PERMILLE, max(0, round(loadavg[0] / cpus * 1000)))
    gpus, gpu_status = _summarise_gpu(_mapping(raw, "gpu", "raw"))
    return MachineCapacity(
        cpus=cpus,
        memory_bytes=memory_bytes,
        memory_available_bytes=memory_available,
        disk_bytes=disk_bytes,
        disk_free_bytes=disk_free,
        load_permille=permille,
        gpus=gpus,
        gpu_status=gpu_status,
    )


def gpu_slug(model: str) -> str:
    """Normalise a GPU model name: lower case, runs of other characters become one ``-``.

    ``"NVIDIA A100-SXM4-40GB"`` becomes ``"nvidia-a100-sxm4-40gb"``.
    """
    return re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-")


def gpu_model_matches(model: str, query: str) -> bool:
    """Whether ``query`` (as given to ``node find --gpu-model``) names ``model``.

    A case-insensitive substring match on the normalised slugs, so ``"rtx 4090"`` and ``"A100"`` both work. A
    query with no letters or digits matches nothing rather than everything.
    """
    wanted = gpu_slug(query)
    return bool(wanted) and wanted in gpu_slug(model)


def resource_classes(cap: MachineCapacity) -> list[str]:
    """Provider-hint classes for a machine, e.g. ``["cpu", "mem:32g", "gpu", "gpu:nvidia-geforce-rtx-4090"]``.

    Always ``"cpu"``; the largest memory tier not above total memory (none below 1 GiB); and, if there are
    GPUs, ``"gpu"`` plus one ``"gpu:<slug>"`` per distinct model in index order.
    """
    classes = ["cpu"]
    tiers = [t for t in MEMORY_TIERS_GIB if t * GIB <= cap.memory_bytes]
    if tiers:
        classes.append(f"mem:{tiers[-1]}g")
    if cap.gpus:
        classes.append("gpu")
        classes.extend(dict.fromkeys(f"gpu:{gpu_slug(g.model)}" for g in cap.gpus))
    return classes


def _summarise_gpu(gpu: Mapping[str, object]) -> tuple[tuple[GpuDevice, ...], str]:
    available = _field(gpu, "available", "raw.gpu")
    if not isinstance(available, bool):
        raise ProbeDataError(f"raw.gpu.available: expected a boolean, got {available!r}")
    if not available:
        return (), f"no GPU (NVML not available: {_str(gpu, 'reason', 'raw.gpu')})"
    devices = _field(gpu, "devices", "raw.gpu")
    if not isinstance(devices, list):
        raise ProbeDataError(f"raw.gpu.devices: expected a list, got {type(devices).__name__}")
    gpus = tuple(_gpu_device(d, f"raw.gpu.devices[{i}]") for i, d in enumerate(devices))
    if len({g.index for g in gpus}) != len(gpus):
        raise ProbeDataError("raw.gpu.devices: duplicate device index")
    if not gpus:
        return (), "no GPU (NVML reports 0 devices)"
    counts = dict.fromkeys((g.model for g in gpus), 0)
    for g in gpus:
        counts[g.model] += 1
    models = ", ".join(model if n == 1 else f"{model} x{n}" for model, n in counts.items())
    return gpus, f"{len(gpus)} GPU{'s' if len(gpus) > 1 else ''}: {models}"


def _gpu_device(raw: object, where: str) -> GpuDevice:
    if not isinstance(raw, Mapping):
        raise ProbeDataError(f"{where}: expected an object, got {type(raw).__name__}")
    memory = _int(raw, "memory_total", where)
    # NVML answers NotSupported for utilisation on some devices (vGPU, MIG); the probe records null and we
    # count it as idle, since the figure is only a hint.
    unknown = _field(raw, "utilization_gpu", where) is None
    return GpuDevice(
        index=_int(raw, "index", where),
        model=_str(raw, "name", where),
        memory_bytes=memory,
        memory_used_bytes=_int(raw, "memory_used", where, maximum=memory),
        utilization_percent=0 if unknown else _int(raw, "utilization_gpu", where, maximum=100),
        uuid=_str(raw, "uuid", where),
    )


def _field(obj: object, key: str, where: str) -> object:
    if not isinstance(obj, Mapping):
        raise ProbeDataError(f"{where}: expected an object, got {type(obj).__name__}")
    if key not in obj:
        raise ProbeDataError(f"{where}.{key}: missing")
    return obj[key]


def _mapping(obj: object, key: str, where: str) -> Mapping[str, object]:
    value = _field(obj, key, where)
    if not isinstance(value, Mapping):
        raise ProbeDataError(f"{where}.{key}: expected an object, got {type(value).__name__}")
    return value


def _int(obj: object, key: str, where: str, *, minimum: int = 0, maximum: int | None = None) -> int:
    value = _field(obj, key, where)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProbeDataError(f"{where}.{key}: expected an integer, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        upper = "" if maximum is None else f"..{maximum}"
        raise ProbeDataError(f"{where}.{key}: {value} is out of range {minimum}{upper}")
    return value


def _str(obj: object, key: str, where: str) -> str:
    value = _field(obj, key, where)
    if not isinstance(value, str):
        raise ProbeDataError(f"{where}.{key}: expected a string, got {value!r}")
    return value


def _is_load(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
