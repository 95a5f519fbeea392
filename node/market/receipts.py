"""The client's side of the paperwork: the quote request a job asks with, and the check of the receipt it is paid by.

Both are pure functions of what the job asked for and what was agreed, so JobManager (node/market/jobs.py) keeps
only the I/O around them.
"""

from __future__ import annotations

from typing import Any, Final

from protocol.cosign import terms_hash, verify_role
from protocol.envelope import message_hash
from protocol.errors import BadSignature
from protocol.messages import Agreement, JobResult, JobSpec, Limits, QuoteRequest, Receipt, Resources
from protocol.pricing import cost_of

USAGE_SLACK_MS: Final = 60_000  # metering may overrun the agreed limits by this much before the receipt is refused


def quote_request(job_id: str, req: dict[str, Any], *, client: str, now_ms: int) -> QuoteRequest:
    """What ``client`` asks providers to quote for the stored request ``req`` (node/market/requests.py)."""
    resources = Resources(cpus=req["cpus"], memory_bytes=req["memory_bytes"], disk_bytes=req["disk_bytes"],
                          gpus=req["gpus"], gpu_model=req["gpu_model"], runtime=req.get("runtime", ""),
                          runtime_sha256=bytes.fromhex(req.get("runtime_sha256", "")))  # fmt: skip
    limits = Limits(cpu_seconds=req["cpu_seconds"], wall_seconds=req["timeout"], memory_bytes=req["memory_bytes"],
                    disk_bytes=req["disk_bytes"], output_bytes=req["output_bytes"])  # fmt: skip
    deadline = now_ms + (req["timeout"] + 300) * 1000
    return QuoteRequest(job_id=job_id, client=client, resources=resources, limits=limits,
                        max_price=req["max_price"], deadline=deadline)  # fmt: skip


def receipt_problem(receipt: Receipt, spec: JobSpec, agreement: Agreement, result: JobResult, *, client: str) -> str:
    """Why ``client`` must not countersign ``receipt`` for this run; ``""`` if it may."""
    if receipt.job_id != spec.job_id or receipt.client != client:
        return "the receipt names another job or client"
    if receipt.provider != agreement.provider or receipt.agreement_hash != terms_hash(agreement):
        return "the receipt is not for our agreement"
    if receipt.result_hash != message_hash(result) or receipt.usage != result.usage:
        return "the receipt does not match the signed result"
    limits = agreement.limits
    if (
        receipt.usage.wall_ms > limits.wall_seconds * 1000 + USAGE_SLACK_MS
        or receipt.usage.cpu_ms > limits.cpu_seconds * 1000 + USAGE_SLACK_MS
    ):
        return "the metered usage exceeds the agreed limits"
    expected = cost_of(receipt.usage, agreement.price_sheet, max_cost=agreement.max_cost)
    if receipt.cost != expected:
        return f"the cost {receipt.cost} is not the agreed price for this usage ({expected})"
    try:
        verify_role(receipt, "provider")
    except BadSignature:
        return "the provider's signature on the receipt is invalid"
    return ""
