"""A fake NVML module with configurable GPUs.

``FakeNvml`` has the pynvml functions ``probe.probe_raw`` calls, under the same names, and an
``NVMLError`` attribute, so it can be passed wherever the ``pynvml`` module would be. Like the real
library it refuses device calls before ``nvmlInit`` and after ``nvmlShutdown``.

A daemon started with ``COOP_FAKE_NVML`` set to a JSON spec probes this fake instead of the real driver, so
multi-process tests can start a node "with a GPU"::

    {"gpus": [{"model": "NVIDIA GeForce RTX 4090", "memory_bytes": 25757220864}]}

Optional per-GPU keys: ``memory_used_bytes`` (default 0), ``utilization_percent`` (default 0), ``uuid``
(default derived from the index). Optional top-level ``init_error``: a message ``nvmlInit`` fails with, to
simulate a machine whose driver is missing.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Final, final

FAKE_NVML_ENV: Final = "COOP_FAKE_NVML"


class NVMLError(Exception):
    """An error from the fake NVML; stands in for ``pynvml.NVMLError``."""


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class FakeGpu:
    """One fake device."""

    model: str
    memory_bytes: int
    memory_used_bytes: int = 0
    utilization_percent: int = 0
    uuid: str = ""


class FakeNvml:
    """A module-like object with pynvml's function names, backed by a list of ``FakeGpu``."""

    NVMLError = NVMLError

    def __init__(self, gpus: Sequence[FakeGpu], *, init_error: str | None = None) -> None:
        """Create a fake driver.

        Args:
            gpus: the devices, in index order.
            init_error: if set, ``nvmlInit`` raises ``NVMLError`` with this message.
        """
        self.gpus = tuple(gpus)
        self.init_error = init_error
        self.initialised = False

    def nvmlInit(self) -> None:
        """Start the fake driver, or fail with ``init_error``."""
        if self.init_error is not None:
            raise NVMLError(self.init_error)
        self.initialised = True

    def nvmlShutdown(self) -> None:
        """Stop the fake driver."""
        self._check()
        self.initialised = False

    def nvmlDeviceGetCount(self) -> int:
        """The number of devices."""
        self._check()
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        """A handle for device ``index`` (the index itself)."""
        self._check()
        if not 0 <= index < len(self.gpus):
            raise NVMLError("Invalid Argument")
        return index

    def nvmlDeviceGetName(self, handle: int) -> str:
        """The device's model name."""
        return self._gpu(handle).model

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        """Memory in bytes as ``total``, ``used`` and ``free`` attributes."""
        gpu = self._gpu(handle)
        used = gpu.memory_used_bytes
        return SimpleNamespace(total=gpu.memory_bytes, used=used, free=gpu.memory_bytes - used)

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> SimpleNamespace:
        """Utilisation in percent as ``gpu`` and ``memory`` attributes."""
        return SimpleNamespace(gpu=self._gpu(handle).utilization_percent, memory=0)

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        """The device's UUID."""
        return self._gpu(handle).uuid or f"GPU-00000000-0000-0000-0000-{handle:012d}"

    def _check(self) -> None:
        if not self.initialised:
            raise NVMLError("Uninitialized")

    def _gpu(self, handle: int) -> FakeGpu:
        self._check()
        return self.gpus[handle]


def fake_nvml_from_spec(spec: object) -> FakeNvml:
    """Build a ``FakeNvml`` from a decoded JSON spec (see the module docstring).

    Raises:
        ValueError: the spec is malformed (the fault of whoever set it up).
    """
    if not isinstance(spec, Mapping) or not set(spec) <= {"gpus", "init_error"}:
        raise ValueError(f"fake NVML spec: expected an object with 'gpus' and/or 'init_error', got {spec!r}")
    gpus = spec.get("gpus", [])
    init_error = spec.get("init_error")
    if not isinstance(gpus, list) or not (init_error is None or isinstance(init_error, str)):
        raise ValueError(f"fake NVML spec: 'gpus' must be a list and 'init_error' a string, got {spec!r}")
    try:
        devices = [FakeGpu(**gpu) for gpu in gpus]
    except TypeError as exc:
        raise ValueError(f"fake NVML spec: bad GPU entry: {exc}") from exc
    for gpu in devices:
        ok_ints = all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0
            for v in (gpu.memory_bytes, gpu.memory_used_bytes, gpu.utilization_percent)
        )
        valid = ok_ints and gpu.memory_used_bytes <= gpu.memory_bytes and gpu.utilization_percent <= 100
        if not (valid and isinstance(gpu.model, str) and isinstance(gpu.uuid, str)):
            raise ValueError(f"fake NVML spec: bad GPU entry {gpu!r}")
    return FakeNvml(devices, init_error=init_error)


def nvml_from_env(environ: Mapping[str, str]) -> FakeNvml | None:
    """The fake NVML that ``COOP_FAKE_NVML`` asks for, or None to use the real driver.

    Args:
        environ: the environment, usually ``os.environ``.

    Raises:
        ValueError: the variable is set but is not a valid JSON spec.
    """
    text = environ.get(FAKE_NVML_ENV)
    if text is None:
        return None
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{FAKE_NVML_ENV}: not valid JSON: {exc}") from exc
    return fake_nvml_from_spec(spec)
