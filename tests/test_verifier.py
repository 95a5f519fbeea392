"""node/market/verify.py: when a run is replicated, how the vote goes, who is rated what, whose files the user gets.

The replicas here are canned runs (the wire is tested in test_market_cluster.py, with real providers lying);
what is real is the Verifier's decision, the vote and the files it moves on disk.
"""

import pytest

from node.market.verify import ResultDisputed, Run, Verifier
from protocol.messages import Outcome

JOB = "j0123456789abcdef0123"


def outcome(provider: str, stdout_digest: str, exit_status: int = 0) -> dict:
    result = {"provider": provider, "stdout_sha256": stdout_digest, "outputs": {"out.txt": {"sha256": stdout_digest}}}
    return {"exit_status": exit_status, "result": result, "cost": 10}


class World:
    """Canned replica runs (one per ``n``), the ratings given, and the job's files on disk."""

    def __init__(self, tmp_path, *, trust: float, replicas: dict[int, Run | None]) -> None:
        self.jobs_dir = tmp_path
        self.replicas = replicas
        self.asked: list[tuple[int, set[str]]] = []
        self.rated: list[tuple[str, Outcome, int]] = []
        self.verifier = Verifier(replicate=self.replicate, rate=self.rate, trust=lambda peer: trust,
                                 jobs_dir=tmp_path, verify_below=0.7, replicas=2)  # fmt: skip
        self.write(tmp_path / JOB, "primary")
        for n, run in replicas.items():
            if run is not None:
                self.write(tmp_path / JOB / f"v{n}", run.provider)

    @staticmethod
    def write(directory, text: str) -> None:
        (directory / "outputs").mkdir(parents=True)
        (directory / "stdout").write_text(text)
        (directory / "stderr").write_text("")
        (directory / "outputs" / "out.txt").write_text(text)

    async def replicate(self, job_id, req, n, exclude):
        assert job_id == JOB
        self.asked.append((n, set(exclude)))
        return self.replicas[n]

    async def rate(self, wire_id, outcome_, score):
        self.rated.append((wire_id, outcome_, score))

    async def verify(self):
        return await self.verifier.verify(JOB, {}, "primary", outcome("primary", "good"), {"primary"})


async def test_a_trusted_provider_is_not_replicated(tmp_path):
    world = World(tmp_path, trust=0.9, replicas={})
    stored = await world.verify()
    assert world.asked == []
    assert world.rated == [(JOB, Outcome.SUCCESS, 100)]
    assert stored["result"]["verified_by"] == []


async def test_a_matching_replica_confirms_the_result(tmp_path):
    world = World(tmp_path, trust=0.5, replicas={1: Run("second", f"{JOB}-v1", outcome("second", "good"))})
    stored = await world.verify()
    assert world.asked == [(1, {"primary"})]
    assert world.rated == [(JOB, Outcome.SUCCESS, 100), (f"{JOB}-v1", Outcome.SUCCESS, 100)]
    assert (stored["provider"], stored["result"]["verification"]) == ("primary", "matched by 1 replica(s)")
    assert stored["result"]["verified_by"] == ["second"]


async def test_an_outvoted_provider_is_rated_zero_and_the_user_gets_the_majoritys_files(tmp_path):
    world = World(tmp_path, trust=0.5, replicas={1: Run("second", f"{JOB}-v1", outcome("second", "good")),
                                                 2: Run("third", f"{JOB}-v2", outcome("third", "good"))})  # fmt: skip
    stored = await world.verifier.verify(JOB, {}, "primary", outcome("primary", "forged"), {"primary"})
    assert world.asked == [(1, {"primary"}), (2, {"primary", "second"})]  # the tie-breaker is a third provider
    assert world.rated == [
        (JOB, Outcome.BAD_RESULT, 0),
        (f"{JOB}-v1", Outcome.SUCCESS, 100),
        (f"{JOB}-v2", Outcome.SUCCESS, 100),
    ]
    assert stored["provider"] == stored["result"]["provider"] == "second"
    assert stored["result"]["verification"].endswith("was outvoted: its result differed from the majority")
    assert (tmp_path / JOB / "stdout").read_text() == "second"
    assert (tmp_path / JOB / "outputs" / "out.txt").read_text() == "second"


async def test_no_second_provider_leaves_the_result_unverified_and_says_so(tmp_path):
    world = World(tmp_path, trust=0.5, replicas={1: None})
    stored = await world.verify()
    assert stored["result"]["verification"] == "unverified: no second provider was available for a replica"
    assert world.rated == [(JOB, Outcome.SUCCESS, 100)]


async def test_two_differing_results_and_no_tie_breaker_is_a_dispute(tmp_path):
    world = World(tmp_path, trust=0.5, replicas={1: Run("second", f"{JOB}-v1", outcome("second", "other")), 2: None})
    with pytest.raises(ResultDisputed, match="differ, and no third provider could break the tie"):
        await world.verify()
    assert world.rated == []  # nobody is blamed without a majority


async def test_three_different_results_is_a_dispute(tmp_path):
    world = World(tmp_path, trust=0.5, replicas={1: Run("second", f"{JOB}-v1", outcome("second", "b")),
                                                 2: Run("third", f"{JOB}-v2", outcome("third", "c"))})  # fmt: skip
    with pytest.raises(ResultDisputed, match="three providers returned three different results"):
        await world.verify()
