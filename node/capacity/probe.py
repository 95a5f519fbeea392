"""The capacity probe's mechanism: ask psutil and NVML, record what they said.

``probe_raw`` produces the raw form described in ``summary`` and does nothing else, so that what it
records on a real machine can be saved as a fixture and the parsing tested without the machine. It never
fails because of the GPU side: a missing library, driver or device gives
``{"available": False, "reason": ...}``.
"""

from __future__ import annotations

import contextlib
import importlib
from pathlib import Path
from typing import Any

import psutil

from node.capacity.summary import RAW_SCHEMA, MachineCapacity, summarise


def probe_raw(*, disk_path: Path, nvml: Any = None) -> dict[str, Any]:
    """Read this machine's capacity as raw, JSON-able probe data.

    Args:
        disk_path: a path on the file system whose size and free space count (the node's work directory).
        nvml: a module-like object with pynvml's functions and ``NVMLError`` (e.g. a ``fake_nvml.FakeNvml``);
            None imports the real ``pynvml``.

    Returns:
        The raw form documented in ``summary``.

    Raises:
        OSError: ``disk_path`` cannot be examined.
    """
    memory = psutil.virtual_memory()
    disk = psutil.disk_usage(str(disk_path))
    return {
        "schema": RAW_SCHEMA,
        # cpu_count answers None when it cannot tell; a machine running this code has at least one.
        "cpus": psutil.cpu_count(logical=True) or 1,
        "memory": {"total": memory.total, "available": memory.available},
        "disk": {"path": str(disk_path), "total": disk.total, "free": disk.free},
        "loadavg": list(psutil.getloadavg()),
        "gpu": _probe_gpu(nvml),
    }


def probe(*, disk_path: Path = Path("/"), nvml: Any = None) -> MachineCapacity:
    """Probe this machine and summarise the result.

    Args:
        disk_path: as for ``probe_raw``.
        nvml: as for ``probe_raw``.

    Raises:
        OSError: ``disk_path`` cannot be examined.
    """
    return summarise(probe_raw(disk_path=disk_path, nvml=nvml))


def _probe_gpu(nvml: Any) -> dict[str, Any]:
    if nvml is None:
        try:
            nvml = importlib.import_module("pynvml")
        except ImportError as exc:
            return {"available": False, "reason": f"pynvml cannot be imported: {exc}"}
    # OSError too: a broken libnvidia-ml can fail in ctypes before pynvml wraps it in NVMLError.
    try:
        nvml.nvmlInit()
    except (nvml.NVMLError, OSError) as exc:
        return {"available": False, "reason": str(exc) or type(exc).__name__}
    try:
        devices = [_probe_device(nvml, i) for i in range(nvml.nvmlDeviceGetCount())]
    except (nvml.NVMLError, OSError) as exc:
        return {"available": False, "reason": str(exc) or type(exc).__name__}
    finally:
        # The data is already read; a failing shutdown changes nothing we report.
        with contextlib.suppress(nvml.NVMLError, OSError):
            nvml.nvmlShutdown()
    return {"available": True, "devices": devices}


def _probe_device(nvml: Any, index: int) -> dict[str, Any]:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    try:
        utilization: int | None = int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
    except nvml.NVMLError:
        utilization = None  # NotSupported on some devices (vGPU, MIG); summary counts it as idle.
    return {
        "index": index,
        "name": _text(nvml.nvmlDeviceGetName(handle)),
        "memory_total": int(memory.total),
        "memory_used": int(memory.used),
        "utilization_gpu": utilization,
        "uuid": _text(nvml.nvmlDeviceGetUUID(handle)),
    }


def _text(value: str | bytes) -> str:
    # pynvml before 11.5 returned bytes; nvidia-ml-py 12 returns str.
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value
