"""The market across real `node start` processes on 127.0.0.1: jobs, receipts, ledgers, competition, failures."""

import base64
import hashlib
import signal

import pytest
import trio

from protocol import codec
from protocol.cosign import verify_both
from protocol.messages import Receipt
from tests.cluster import wait_until

pytestmark = pytest.mark.slow


async def start_network(launcher, floors, *, client_args=("--no-provide",), client_config=""):
    """Providers with the given per-CPU-second floors, and one client node; all bootstrapped from the first.

    ``client_config`` is appended to the client's config.toml."""
    providers = []
    first = launcher.make("p0", per_cpu_second=floors[0])
    await launcher.start(first)
    providers.append(first)
    async with trio.open_nursery() as nursery:
        for i, floor in enumerate(floors[1:], start=1):
            node = launcher.make(f"p{i}", bootstrap=[first.address], per_cpu_second=floor)
            providers.append(node)
            nursery.start_soon(launcher.start, node)
        client = launcher.make("client", bootstrap=[first.address], extra_args=list(client_args))
        with (client.data_dir / "config.toml").open("a") as config:
            config.write(client_config)
        nursery.start_soon(launcher.start, client)
    ids = {p.peer_id for p in providers}

    async def sees_all():
        return {p["peer_id"] for p in await client.cli("find", "--cpus", "1")} >= ids

    await wait_until(sees_all)
    return providers, client


def receipt_of(job):
    receipt = codec.decode(base64.b64decode(job["receipt"]["wire_b64"]), Receipt)
    verify_both(receipt)  # raises unless both peers' signatures verify
    return receipt


async def test_jobs_results_receipts_and_ledgers(launcher, tmp_path):
    with trio.fail_after(120):
        (provider,), client = await start_network(launcher, [10])
        job_id = await client.submit(["python3", "-c", "print(6*7)"])
        job = await client.wait_job(job_id)
        assert job["state"] == "completed", job
        assert job["exit_status"] == 0
        assert job["provider"] == provider.peer_id
        assert await client.api("GET", f"/v1/jobs/{job_id}/logs") == b"42\n"
        receipt = receipt_of(job)
        assert (receipt.client, receipt.provider) == (client.peer_id, provider.peer_id)
        assert receipt.cost == job["cost"] > 0

        data = b"hello coop\n" * 1000
        source = tmp_path / "in.txt"
        source.write_bytes(data)
        script = "d=open('in.txt','rb').read(); open('out.txt','wb').write(d.upper()); print(len(d))"
        job_id2 = await client.submit(
            ["python3", "-c", script], inputs=[{"name": "in.txt", "path": str(source)}], outputs=["out.txt"]
        )
        job2 = await client.wait_job(job_id2)
        assert job2["state"] == "completed", job2
        expected = data.upper()
        assert job2["result"]["outputs"]["out.txt"] == {
            "sha256": hashlib.sha256(expected).hexdigest(),
            "size": len(expected),
        }
        assert await client.api("GET", f"/v1/jobs/{job_id2}/outputs/out.txt") == expected
        assert await client.api("GET", f"/v1/jobs/{job_id2}/logs") == f"{len(data)}\n".encode()
        receipt_of(job2)

        # the provider holds the same receipts, and both ledgers agree
        on_provider = await provider.api("GET", f"/v1/jobs/{job_id2}")
        assert on_provider["role"] == "provider"
        assert on_provider["receipt"]["wire_b64"] == job2["receipt"]["wire_b64"]
        spent = await client.api("GET", "/v1/ledger")
        earned = await provider.api("GET", "/v1/ledger")
        assert spent["spent"] == earned["earned"] == job["cost"] + job2["cost"]
        assert spent["earned"] == earned["spent"] == 0
        assert {e["job_id"] for e in spent["entries"]} == {e["job_id"] for e in earned["entries"]} == {job_id, job_id2}


async def test_cheapest_provider_wins_and_too_low_a_max_price_fails_with_reasons(launcher):
    with trio.fail_after(120):
        providers, client = await start_network(launcher, [30, 10, 20])
        cheapest = providers[1]
        job_id = await client.submit(["true"], timeout=10, max_price=10_000)
        job = await client.wait_job(job_id)
        assert job["state"] == "completed", job
        assert job["provider"] == cheapest.peer_id
        market = await client.api("GET", "/v1/market")
        quotes = {q["provider"]: q for q in market["recent"] if q["job_id"] == job_id}
        assert set(quotes) == {p.peer_id for p in providers}  # all three competed
        assert [p for p, q in quotes.items() if q["outcome"] == "accepted"] == [cheapest.peer_id]
        assert quotes[cheapest.peer_id]["cost"] == min(q["cost"] for q in quotes.values())
        (cpu,) = market["summary"]
        assert cpu["providers"] == 3
        assert cpu["min_cost"] < cpu["max_cost"]
        # a new provider's result is verified by a replica on the next best offer (protocol/trust.py, jobs.py)
        assert job["result"]["verification"].startswith("matched by 1 replica")

        failed = await client.wait_job(await client.submit(["true"], timeout=10, max_price=50))
        assert failed["state"] == "failed"
        assert failed["error"] == "3 providers: 3 priced above your max price (your max price is 50 milli-credits)"
        assert failed["receipt"] is None


async def test_killed_provider_mid_job_the_job_completes_elsewhere_with_one_receipt(launcher):
    with trio.fail_after(150):
        providers, client = await start_network(launcher, [20, 10])
        cheap, other = providers[1], providers[0]
        script = "import time; print('started', flush=True); time.sleep(5); print('finished')"
        job_id = await client.submit(["python3", "-c", script], timeout=30)

        async def running_on_cheap_with_output():
            job = await client.api("GET", f"/v1/jobs/{job_id}")
            logs = await client.api("GET", f"/v1/jobs/{job_id}/logs")
            return job["state"] == "running" and job["provider"] == cheap.peer_id and logs == b"started\n"

        await wait_until(running_on_cheap_with_output, interval=0.1)
        cheap.kill()
        job = await client.wait_job(job_id)
        assert job["state"] == "completed", job
        assert job["provider"] == other.peer_id
        assert [a["provider"] for a in job["attempts"]] == [cheap.peer_id, other.peer_id]
        assert job["attempts"][0]["outcome"] == "failed"
        assert "went away" in job["attempts"][0]["reason"]
        assert await client.api("GET", f"/v1/jobs/{job_id}/logs") == b"started\nfinished\n"
        ledger = await client.api("GET", "/v1/ledger")
        assert [e["job_id"] for e in ledger["entries"]] == [job_id]  # one receipt only
        assert receipt_of(job).provider == other.peer_id


async def test_client_restart_while_a_job_runs(launcher):
    with trio.fail_after(150):
        (provider,), client = await start_network(launcher, [10])
        script = "import time; print('started', flush=True); time.sleep(3); print('finished')"
        job_id = await client.submit(["python3", "-c", script], timeout=30)

        async def running():
            return (await client.api("GET", f"/v1/jobs/{job_id}/logs")) == b"started\n"

        await wait_until(running, interval=0.1)
        client.kill()
        await client.process.wait()
        await launcher.start(client)
        job = await client.wait_job(job_id)
        assert job["state"] == "completed", (job["error"], job["attempts"])
        assert await client.api("GET", f"/v1/jobs/{job_id}/logs") == b"started\nfinished\n"
        assert [a["outcome"] for a in job["attempts"]] == ["interrupted", "completed"]
        receipt_of(job)
        on_provider = await provider.api("GET", f"/v1/jobs/{job_id}")
        assert on_provider["state"] == "completed"
        assert [a["outcome"] for a in on_provider["attempts"]] == ["cancelled", "completed"]
        client.process.send_signal(signal.SIGTERM)


async def test_jobs_beyond_the_free_slots_queue_until_a_slot_frees(launcher):
    with trio.fail_after(150):
        (provider,), client = await start_network(launcher, [10])  # 2 job slots (the default max_jobs)
        script = "import time; time.sleep(1.5); print('ok')"
        job_ids = [await client.submit(["python3", "-c", script], timeout=30) for _ in range(4)]

        async def some_queued():
            states = [(await client.api("GET", f"/v1/jobs/{j}"))["error"] or "" for j in job_ids]
            return any(s.startswith("waiting for a free provider (1 provider: 1 busy") for s in states)

        await wait_until(some_queued, interval=0.1)
        jobs = [await client.wait_job(j) for j in job_ids]
        assert [j["state"] for j in jobs] == ["completed"] * 4, [j["error"] for j in jobs]
        assert all(j["provider"] == provider.peer_id and len(j["attempts"]) == 1 for j in jobs)


async def test_a_clients_own_jobs_never_bid_against_each_other_for_a_slot(launcher):
    """Twelve jobs at once, one provider with two slots. A quote promises a free slot; if two of our jobs held
    quotes for the last one, the second accept would be refused ("busy") and its negotiation wasted. The client
    negotiates with a provider for one of its jobs at a time, so every quote it gets is one it can take."""
    with trio.fail_after(150):
        (provider,), client = await start_network(launcher, [10])  # 2 job slots (the default max_jobs)
        job_ids: list[str] = []

        async def submit() -> None:
            job_ids.append(await client.submit(["true"], timeout=30))

        async with trio.open_nursery() as nursery:
            for _ in range(12):
                nursery.start_soon(submit)
        jobs = [await client.wait_job(j) for j in job_ids]
        assert [j["state"] for j in jobs] == ["completed"] * 12, [j["error"] for j in jobs]
        assert all(j["provider"] == provider.peer_id and len(j["attempts"]) == 1 for j in jobs)
        quotes = (await client.api("GET", "/v1/market"))["recent"]
        assert sorted(q["job_id"] for q in quotes) == sorted(job_ids)  # one quote per job...
        assert {q["outcome"] for q in quotes} == {"accepted"}  # ...and never refused at accept


async def test_a_job_gives_up_when_every_provider_stays_busy_past_its_patience(launcher):
    """``[jobs] busy_patience_seconds``: a job that only ever hears "busy" fails after it, saying why."""
    with trio.fail_after(150):
        (provider,), client = await start_network(launcher, [10], client_config="[jobs]\nbusy_patience_seconds = 2\n")
        script = "import time; print('started', flush=True); time.sleep(60)"  # holds its slot until cancelled
        holders = [await client.submit(["python3", "-c", script], timeout=60) for _ in range(2)]  # both slots

        async def running():
            return [(await client.api("GET", f"/v1/jobs/{j}"))["state"] for j in holders] == ["running"] * 2

        await wait_until(running, interval=0.1)
        job = await client.wait_job(await client.submit(["echo", "late"], timeout=30))
        assert job["state"] == "failed", job
        assert job["error"] == (
            "gave up after waiting 2 s for a free provider ([jobs] busy_patience_seconds): "
            "1 provider: 1 busy (your max price is 100000 milli-credits)"
        )
        assert job["attempts"] == []  # it never ran anywhere
        ran = {j["job_id"] for j in (await provider.api("GET", "/v1/jobs"))["jobs"] if j["role"] == "provider"}
        assert ran == set(holders)
        for job_id in holders:
            await client.api("POST", f"/v1/jobs/{job_id}/cancel")
        for job_id in holders:
            assert (await client.wait_job(job_id))["state"] == "cancelled"
