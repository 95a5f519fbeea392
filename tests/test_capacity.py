"""Capacity probe: summaries of recorded probe data, the fake NVML, and the real probe on this machine."""

import dataclasses
import json
import sys
from pathlib import Path

import pytest

from node.capacity.fake_nvml import FAKE_NVML_ENV, FakeGpu, FakeNvml, NVMLError, nvml_from_env
from node.capacity.probe import probe, probe_raw
from node.capacity.summary import (
    GIB,
    GpuDevice,
    MachineCapacity,
    ProbeDataError,
    gpu_model_matches,
    resource_classes,
    summarise,
)

FIXTURES = Path(__file__).parent / "fixtures" / "capacity"
RTX_4090_BYTES = 25_757_220_864  # what NVML reports for a 24 GiB RTX 4090


def load(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


def workstation_nvml() -> FakeNvml:
    """The fake driver the workstation fixture's GPU section was recorded from."""
    return FakeNvml(
        [
            FakeGpu(
                model="NVIDIA GeForce RTX 4090",
                memory_bytes=RTX_4090_BYTES,
                memory_used_bytes=GIB,
                utilization_percent=37,
                uuid="GPU-5f3a2c1e-8b7d-4e6f-9a0b-1c2d3e4f5a6b",
            ),
            FakeGpu(
                model="NVIDIA GeForce RTX 4090",
                memory_bytes=RTX_4090_BYTES,
                uuid="GPU-0e9d8c7b-6a5f-4e3d-2c1b-0a9f8e7d6c5b",
            ),
        ]
    )


# --- summaries of recorded data ---------------------------------------------------------------------------


def test_summarise_this_machine_recording():
    # Recorded with probe_raw(disk_path=Path("/")) on the development container (no NVIDIA driver).
    cap = summarise(load("this_machine_no_gpu.json"))
    assert cap == MachineCapacity(
        cpus=2,
        memory_bytes=25_276_063_744,
        memory_available_bytes=24_971_882_496,
        disk_bytes=270_553_174_016,
        disk_free_bytes=85_497_786_368,
        load_permille=68,  # 0.13671875 / 2 cpus
        gpus=(),
        gpu_status="no GPU (NVML not available: NVML Shared Library Not Found)",
    )
    assert resource_classes(cap) == ["cpu", "mem:16g"]  # 23.5 GiB


def test_summarise_workstation_recording():
    cap = summarise(load("workstation_2x4090.json"))
    assert cap == MachineCapacity(
        cpus=32,
        memory_bytes=67_222_183_936,
        memory_available_bytes=51_539_607_552,
        disk_bytes=1_000_204_886_016,
        disk_free_bytes=612_345_678_848,
        load_permille=234,  # 7.5 / 32 cpus
        gpus=(
            GpuDevice(
                index=0,
                model="NVIDIA GeForce RTX 4090",
                memory_bytes=RTX_4090_BYTES,
                memory_used_bytes=GIB,
                utilization_percent=37,
                uuid="GPU-5f3a2c1e-8b7d-4e6f-9a0b-1c2d3e4f5a6b",
            ),
            GpuDevice(
                index=1,
                model="NVIDIA GeForce RTX 4090",
                memory_bytes=RTX_4090_BYTES,
                memory_used_bytes=0,
                utilization_percent=0,
                uuid="GPU-0e9d8c7b-6a5f-4e3d-2c1b-0a9f8e7d6c5b",
            ),
        ),
        gpu_status="2 GPUs: NVIDIA GeForce RTX 4090 x2",
    )
    # A "64 GB" machine reports 62.6 GiB to the OS, so it lands in the 32 GiB tier.
    assert resource_classes(cap) == ["cpu", "mem:32g", "gpu", "gpu:nvidia-geforce-rtx-4090"]


def test_malformed_recording_raises():
    with pytest.raises(ProbeDataError, match=r"raw\.cpus: expected an integer, got '16'"):
        summarise(load("malformed.json"))


def _without(key):
    return lambda raw: raw["memory"].pop(key)


def _set(path, value):
    def mutate(raw):
        *parents, last = path
        target = raw
        for p in parents:
            target = target[p]
        target[last] = value

    return mutate


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (_without("available"), r"raw\.memory\.available: missing"),
        (_set(["schema"], 2), r"raw\.schema: unsupported schema 2"),
        (_set(["cpus"], True), r"raw\.cpus: expected an integer"),
        (_set(["cpus"], 0), r"raw\.cpus: 0 is out of range 1"),
        (_set(["memory"], [1, 2]), r"raw\.memory: expected an object"),
        (_set(["memory", "available"], 10**12), r"raw\.memory\.available: .* out of range"),
        (_set(["disk", "free"], -1), r"raw\.disk\.free: -1 is out of range"),
        (_set(["loadavg"], [1.0, 2.0]), r"raw\.loadavg: expected 3"),
        (_set(["loadavg"], [float("nan"), 0, 0]), r"raw\.loadavg"),
        (_set(["gpu", "available"], "yes"), r"raw\.gpu\.available: expected a boolean"),
        (_set(["gpu", "devices"], {}), r"raw\.gpu\.devices: expected a list"),
        (_set(["gpu", "devices", 1], "GPU"), r"raw\.gpu\.devices\[1\]: expected an object"),
        (_set(["gpu", "devices", 1, "name"], None), r"raw\.gpu\.devices\[1\]\.name: expected a string"),
        (_set(["gpu", "devices", 1, "utilization_gpu"], 101), r"devices\[1\]\.utilization_gpu: 101"),
        (_set(["gpu", "devices", 1, "memory_used"], RTX_4090_BYTES + 1), r"devices\[1\]\.memory_used"),
        (_set(["gpu", "devices", 1, "index"], 0), r"duplicate device index"),
    ],
)
def test_malformed_fields_raise(mutate, message):
    raw = load("workstation_2x4090.json")
    mutate(raw)
    with pytest.raises(ProbeDataError, match=message):
        summarise(raw)


@pytest.mark.parametrize("raw", [None, [], "raw", {}])
def test_malformed_top_level_raises(raw):
    with pytest.raises(ProbeDataError, match=r"raw"):
        summarise(raw)


def test_unavailable_gpu_needs_a_reason():
    raw = load("this_machine_no_gpu.json")
    del raw["gpu"]["reason"]
    with pytest.raises(ProbeDataError, match=r"raw\.gpu\.reason: missing"):
        summarise(raw)


def test_load_is_clamped():
    raw = load("this_machine_no_gpu.json")
    raw["loadavg"] = [1000.0, 0.0, 0.0]
    assert summarise(raw).load_permille == 10_000


def test_gpu_status_for_mixed_and_zero_devices():
    raw = load("workstation_2x4090.json")
    raw["gpu"]["devices"].append({**raw["gpu"]["devices"][0], "index": 2, "name": "NVIDIA A100-SXM4-40GB"})
    raw["gpu"]["devices"][1]["utilization_gpu"] = None  # NotSupported: counted as idle
    cap = summarise(raw)
    assert cap.gpu_status == "3 GPUs: NVIDIA GeForce RTX 4090 x2, NVIDIA A100-SXM4-40GB"
    assert cap.gpus[1].utilization_percent == 0
    assert resource_classes(cap)[2:] == ["gpu", "gpu:nvidia-geforce-rtx-4090", "gpu:nvidia-a100-sxm4-40gb"]
    raw["gpu"]["devices"] = []
    assert summarise(raw).gpu_status == "no GPU (NVML reports 0 devices)"


# --- resource classes and model matching -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("memory_bytes", "expected"),
    [
        (GIB // 2, ["cpu"]),
        (GIB, ["cpu", "mem:1g"]),
        (8 * GIB - 1, ["cpu", "mem:4g"]),
        (8 * GIB, ["cpu", "mem:8g"]),
        (130 * GIB, ["cpu", "mem:128g"]),
        (4096 * GIB, ["cpu", "mem:512g"]),
    ],
)
def test_memory_tiers(memory_bytes, expected):
    cap = dataclasses.replace(summarise(load("this_machine_no_gpu.json")), memory_bytes=memory_bytes)
    assert resource_classes(cap) == expected


@pytest.mark.parametrize(
    ("model", "query", "expected"),
    [
        ("NVIDIA A100-SXM4-40GB", "a100", True),
        ("NVIDIA A100-SXM4-40GB", "A100 SXM4", True),
        ("NVIDIA A100-SXM4-40GB", "nvidia-a100-sxm4-40gb", True),
        ("NVIDIA GeForce RTX 4090", "rtx 4090", True),
        ("NVIDIA GeForce RTX 4090", "RTX_4090", True),
        ("NVIDIA GeForce RTX 4090", "4080", False),
        ("NVIDIA H100 80GB HBM3", "a100", False),
        ("NVIDIA H100 80GB HBM3", "", False),
        ("NVIDIA H100 80GB HBM3", " - ", False),
    ],
)
def test_gpu_model_matches(model, query, expected):
    assert gpu_model_matches(model, query) is expected


# --- the probe mechanism ------------------------------------------------------------------------------------


def test_probe_raw_with_fake_two_gpu_nvml(tmp_path):
    nvml = workstation_nvml()
    raw = probe_raw(disk_path=tmp_path, nvml=nvml)
    assert raw["gpu"] == load("workstation_2x4090.json")["gpu"]
    assert raw["disk"]["path"] == str(tmp_path)
    assert not nvml.initialised  # shut down again
    cap = summarise(json.loads(json.dumps(raw)))  # survives a JSON round trip, as fixtures do
    assert cap.gpu_status == "2 GPUs: NVIDIA GeForce RTX 4090 x2"
    assert "gpu:nvidia-geforce-rtx-4090" in resource_classes(cap)


def test_probe_reports_nvml_init_failure(tmp_path):
    cap = probe(disk_path=tmp_path, nvml=FakeNvml([], init_error="Driver Not Loaded"))
    assert cap.gpus == ()
    assert cap.gpu_status == "no GPU (NVML not available: Driver Not Loaded)"


def test_probe_reports_failure_midway_and_shuts_down(tmp_path):
    class BrokenName(FakeNvml):
        def nvmlDeviceGetName(self, handle):
            raise NVMLError("GPU is lost")

    nvml = BrokenName([FakeGpu(model="NVIDIA T4", memory_bytes=16 * GIB)])
    cap = probe(disk_path=tmp_path, nvml=nvml)
    assert cap.gpu_status == "no GPU (NVML not available: GPU is lost)"
    assert not nvml.initialised


def test_probe_records_unsupported_utilization_as_null(tmp_path):
    class NoUtilization(FakeNvml):
        def nvmlDeviceGetUtilizationRates(self, handle):
            raise NVMLError("Not Supported")

    raw = probe_raw(disk_path=tmp_path, nvml=NoUtilization([FakeGpu(model="NVIDIA T4", memory_bytes=GIB)]))
    assert raw["gpu"]["devices"][0]["utilization_gpu"] is None
    assert summarise(raw).gpus[0].utilization_percent == 0


def test_probe_without_pynvml_says_no_gpu(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes the import fail
    cap = probe(disk_path=tmp_path)
    assert cap.gpus == ()
    assert cap.gpu_status.startswith("no GPU (NVML not available: pynvml cannot be imported")


def test_real_probe_on_this_machine(tmp_path):
    cap = probe(disk_path=tmp_path)
    assert cap.cpus >= 1
    assert 0 < cap.memory_available_bytes <= cap.memory_bytes
    assert 0 < cap.disk_free_bytes <= cap.disk_bytes
    assert 0 <= cap.load_permille <= 10_000
    assert resource_classes(cap)[0] == "cpu"
    if not Path("/dev/nvidiactl").exists():
        assert cap.gpus == ()
        assert cap.gpu_status.startswith("no GPU (NVML not available: ")


# --- the fake NVML from the environment ---------------------------------------------------------------------


def test_nvml_from_env(tmp_path):
    assert nvml_from_env({}) is None
    spec = {"gpus": [{"model": "NVIDIA GeForce RTX 4090", "memory_bytes": RTX_4090_BYTES}]}
    nvml = nvml_from_env({FAKE_NVML_ENV: json.dumps(spec)})
    cap = probe(disk_path=tmp_path, nvml=nvml)
    assert cap.gpus == (
        GpuDevice(
            index=0,
            model="NVIDIA GeForce RTX 4090",
            memory_bytes=RTX_4090_BYTES,
            memory_used_bytes=0,
            utilization_percent=0,
            uuid="GPU-00000000-0000-0000-0000-000000000000",
        ),
    )
    assert cap.gpu_status == "1 GPU: NVIDIA GeForce RTX 4090"
    no_driver = nvml_from_env({FAKE_NVML_ENV: '{"init_error": "Driver Not Loaded"}'})
    assert probe(disk_path=tmp_path, nvml=no_driver).gpu_status.startswith("no GPU (")


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[]",
        '{"gpu": []}',
        '{"gpus": {}}',
        '{"gpus": [{"model": "X"}]}',
        '{"gpus": [{"model": "X", "memory_bytes": 1, "colour": "red"}]}',
        '{"gpus": [{"model": "X", "memory_bytes": -1}]}',
        '{"gpus": [{"model": "X", "memory_bytes": 1, "memory_used_bytes": 2}]}',
        '{"gpus": [{"model": 7, "memory_bytes": 1}]}',
        '{"init_error": 3}',
    ],
)
def test_bad_fake_nvml_spec_raises(text):
    with pytest.raises(ValueError, match=FAKE_NVML_ENV if text == "not json" else "fake NVML spec"):
        nvml_from_env({FAKE_NVML_ENV: text})


def test_fake_nvml_refuses_calls_before_init():
    nvml = workstation_nvml()
    with pytest.raises(NVMLError, match="Uninitialized"):
        nvml.nvmlDeviceGetCount()
    nvml.nvmlInit()
    with pytest.raises(NVMLError, match="Invalid Argument"):
        nvml.nvmlDeviceGetHandleByIndex(2)


def test_summary_module_is_pure():
    import ast

    import node.capacity.summary as summary

    tree = ast.parse(Path(summary.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not imported & {"psutil", "pynvml", "time", "datetime", "trio", "os"}
