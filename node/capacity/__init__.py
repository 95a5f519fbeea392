"""Capacity probing: what this machine can offer to the market.

Policy and mechanism are kept apart (as Bacalhau keeps "run nvidia-smi" apart from "parse its output"), so the
parser is tested on recorded probe data in ``tests/fixtures/capacity/``.

Modules:
    summary: pure. ``ProbeDataError``, the frozen ``GpuDevice`` / ``MachineCapacity`` summaries,
        ``summarise(raw)`` over recorded raw probe data, ``resource_classes(cap)`` (provider-hint classes such
        as ``"mem:32g"`` and ``"gpu:nvidia-a100-sxm4-40gb"``) and ``gpu_model_matches`` for ``--gpu-model``.
    probe: the mechanism. ``probe_raw`` reads psutil and NVML (pynvml, or an injected fake) into a plain dict;
        ``probe`` summarises it. A machine without a GPU or driver yields "no GPU (...)", never an exception.
    fake_nvml: a fake NVML module with N configurable GPUs, for tests and for daemons started with the
        ``COOP_FAKE_NVML`` environment variable (``nvml_from_env``).
"""
