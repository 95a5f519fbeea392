"""In-process: dashboard login codes and public paths, /metrics from a real store, JSON logs, progress bars."""

import dataclasses
import io
import json
import logging

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from node.api import is_public, serve_api
from node.api_dashboard import CODE_TTL_S, MAX_CODES, LoginCodes, dashboard_routes
from node.client import progress_bar
from node.logs import JsonFormatter, level_for, setup_logging
from node.metrics import NodeMetrics
from node.net import NetStatistics
from node.store import Store

TOKEN = "secret-token"


def net_stats():
    counts = {"connected_peers": 3, "routing_table_size": 5, "dht_records_rejected": 4, "gossip_received": 11,
              "streams_opened": 7, "streams_accepted": 9, "streams_limited": 2, "connections_refused": 5}  # fmt: skip
    values = {f.name: counts.get(f.name, 0) for f in dataclasses.fields(NetStatistics)}
    return NetStatistics(**(values | {"refused": {"oversized": 2, "bad-signature": 1}}))


@pytest.fixture
def store(tmp_path):
    with Store.open(tmp_path / "coop.db") as s:
        yield s


def samples(text):
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_read_jobs_kills_and_network_counters_at_scrape_time(store):
    request = {"command": ["true"], "cpus": 1}
    for job_id, role, fields in [
        ("a", "client", {"state": "completed"}),
        ("b", "client", {"state": "failed"}),
        ("c", "provider", {"state": "failed", "termination": "memory-limit"}),
        ("d", "provider", {"state": "failed", "termination": "memory-limit"}),
        ("e", "provider", {"state": "completed", "termination": "exited"}),
    ]:
        store.create_job(job_id, role, request=request, now_ms=1)
        store.update_job(job_id, role, now_ms=2, **fields)
    metrics = NodeMetrics(store=store, net_statistics=net_stats,
                          reputation_statistics=lambda: {"records": 4, "accepted_by_gossip": 3, "pulled": 1,
                                                         "rejected": {"bad-signature": 2}})  # fmt: skip
    metrics.observe_quote(12.0)
    metrics.observe_job("completed", 1_000, 3_500)
    got = samples(metrics.render().decode())
    assert got[("coop_jobs", (("role", "client"), ("state", "completed")))] == 1
    assert got[("coop_jobs", (("role", "provider"), ("state", "failed")))] == 2
    assert got[("coop_sandbox_kills_total", (("reason", "memory-limit"),))] == 2
    assert ("coop_sandbox_kills_total", (("reason", "exited"),)) not in got  # ending on its own is not a kill
    assert got[("coop_refused_frames_total", (("reason", "oversized"),))] == 2
    assert got[("coop_gossip_messages_total", (("event", "received"),))] == 11
    assert got[("coop_dht_records_rejected_total", ())] == 4
    assert got[("coop_streams_total", (("event", "limited"),))] == 2
    assert got[("coop_connections_refused_total", ())] == 5
    assert got[("coop_reputation_rejected_total", (("reason", "bad-signature"),))] == 2
    assert got[("coop_quote_latency_seconds_count", ())] == 1
    assert got[("coop_quote_latency_seconds_bucket", (("le", "0.025"),))] == 1
    assert got[("coop_quote_latency_seconds_bucket", (("le", "0.01"),))] == 0
    assert got[("coop_job_latency_seconds_sum", (("state", "completed"),))] == 2.5
    # each node its own registry: a second one starts from zero
    assert samples(NodeMetrics().render().decode())[("coop_quote_latency_seconds_count", ())] == 0


async def test_login_codes_work_once_and_expire(autojump_clock):
    codes = LoginCodes(TOKEN)
    first, second = codes.issue(), codes.issue()
    assert first != second
    assert codes.redeem(first) == TOKEN
    assert codes.redeem(first) is None  # spent
    assert codes.redeem("made-up") is None
    await trio.sleep(CODE_TTL_S + 1)
    assert codes.redeem(second) is None  # expired
    many = [codes.issue() for _ in range(MAX_CODES + 3)]
    assert codes.redeem(many[0]) is None  # the oldest were dropped past the bound
    assert codes.redeem(many[-1]) == TOKEN


def test_only_the_page_and_the_code_exchange_are_public():
    assert is_public("GET", "/dashboard")
    assert is_public("GET", "/dashboard/static/app.js")
    assert is_public("POST", "/v1/dashboard/session")
    for method, path in [("GET", "/metrics"), ("POST", "/v1/dashboard/link"), ("GET", "/v1/dashboard/network"),
                         ("GET", "/v1/dashboard/session"), ("POST", "/dashboard"), ("GET", "/dashboards"),
                         ("GET", "/"), ("GET", "/v1/jobs")]:  # fmt: skip
        assert not is_public(method, path), (method, path)


class Backend:
    def __init__(self, store):
        self.codes = LoginCodes(TOKEN)
        self.store = store

    def extra_routes(self):
        return dashboard_routes(node=self, store=self.store, reputation=None, metrics=NodeMetrics(store=self.store),
                                codes=self.codes)  # fmt: skip

    def api_id(self):
        return {"peer_id": "12D3KooWtest", "addrs": []}

    def api_peers(self):
        return {"peers": []}

    def api_status(self):
        return {"peer_id": "12D3KooWtest"}

    async def api_find(self, query):
        return {"providers": []}


async def test_the_page_loads_without_the_token_and_its_data_needs_it(nursery, store):
    shutdown = trio.Event()
    url = await nursery.start(lambda task_status: serve_api(Backend(store), host="127.0.0.1", port=0, token=TOKEN,
                                                            shutdown=shutdown, task_status=task_status))  # fmt: skip
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with trio.fail_after(20):
        async with httpx.AsyncClient(base_url=url, trust_env=False) as http:
            page = await http.get("/dashboard")
            assert page.status_code == 200
            assert "default-src 'self'" in page.headers["content-security-policy"]
            assert "<script" in page.text
            assert TOKEN not in page.text
            assert (await http.get("/dashboard/static/app.js")).headers["content-type"].startswith("text/javascript")
            assert (await http.get("/dashboard/static/../api.py")).status_code == 404
            assert (await http.get("/dashboard/static/missing.js")).status_code == 404
            assert (await http.get("/metrics")).status_code == 401
            assert (await http.post("/v1/dashboard/link")).status_code == 401
            assert (await http.get("/v1/dashboard/quotes")).status_code == 401

            link = (await http.post("/v1/dashboard/link", headers=auth)).json()["url"]
            assert link.startswith(f"{url}/dashboard#code=")
            code = link.split("#code=")[1]
            traded = await http.post("/v1/dashboard/session", json={"code": code})
            assert traded.json() == {"token": TOKEN}
            again = await http.post("/v1/dashboard/session", json={"code": code})
            assert again.status_code == 401
            assert "run `node dashboard` again" in again.json()["message"]
            for body in (b"", b"[]", b'{"code": 5}', b'{"code": "' + b"x" * 100 + b'"}', b"x" * 5000):
                assert (await http.post("/v1/dashboard/session", content=body)).status_code == 400, body

            metrics = await http.get("/metrics", headers=auth)
            assert metrics.headers["content-type"].startswith("text/plain")
            assert "coop_jobs" in metrics.text
    shutdown.set()


def test_json_logs_are_one_object_per_line():
    stream = io.StringIO()
    setup_logging("INFO", fmt="json", stream=stream)
    try:
        log = logging.getLogger("coop.test")
        log.info("job %s done\nsecond line", "abc", extra={"job_id": "abc"})
        log.debug("not shown at INFO")
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
    finally:
        setup_logging("WARNING")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["message"] == "job abc done\nsecond line"
    assert (first["level"], first["logger"], first["job_id"]) == ("INFO", "coop.test", "abc")
    assert first["ts"].endswith("+00:00")
    assert second["level"] == "ERROR"
    assert "ValueError: boom" in second["exc"]
    assert isinstance(JsonFormatter().format(logging.makeLogRecord({"msg": "x"})), str)


def test_log_levels_from_verbose_and_quiet():
    assert level_for() is None
    assert level_for(verbose=1) == "INFO"
    assert level_for(verbose=2) == "DEBUG"
    assert level_for(quiet=True) == "ERROR"
    with pytest.raises(ValueError, match="log format"):
        setup_logging(fmt="xml")


def test_the_map_progress_bar_shows_only_when_asked_or_on_a_terminal(monkeypatch):
    shown, hidden = io.StringIO(), io.StringIO()
    for stream, show in ((shown, True), (hidden, None)):
        monkeypatch.setattr("sys.stderr", stream)  # a StringIO is not a terminal
        with progress_bar(3, show) as bar:
            for _ in range(3):
                bar.update(1)
    assert "3/3" in shown.getvalue()
    assert hidden.getvalue() == ""
