"""The local API in-process: token required on every route, queries validated."""

import httpx
import pytest
import trio

from node.api import FindQuery, serve_api

TOKEN = "secret-token"


class FakeBackend:
    def __init__(self):
        self.queries = []

    def extra_routes(self):
        return []

    def api_id(self):
        return {"peer_id": "12D3KooWtest", "addrs": []}

    def api_peers(self):
        return {"peers": []}

    def api_status(self):
        return {"peer_id": "12D3KooWtest"}

    async def api_find(self, query: FindQuery):
        self.queries.append(query)
        return {"providers": []}


@pytest.fixture
async def api(nursery):
    backend = FakeBackend()
    shutdown = trio.Event()
    url = await nursery.start(
        lambda task_status: serve_api(
            backend, host="127.0.0.1", port=0, token=TOKEN, shutdown=shutdown, task_status=task_status
        )
    )
    yield url, backend
    shutdown.set()


@pytest.mark.parametrize("path", ["/v1/id", "/v1/peers", "/v1/status", "/v1/find", "/v1/nope", "/"])
async def test_requests_without_the_token_get_401(api, path):
    url, _ = api
    with trio.fail_after(10):
        async with httpx.AsyncClient(base_url=url, trust_env=False) as http:
            assert (await http.get(path)).status_code == 401
            wrong = await http.get(path, headers={"Authorization": "Bearer wrong"})
            assert wrong.status_code == 401
            assert "bearer token" in wrong.json()["message"]


async def test_requests_with_the_token_are_served(api):
    url, backend = api
    with trio.fail_after(10):
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with httpx.AsyncClient(base_url=url, headers=headers, trust_env=False) as http:
            assert (await http.get("/v1/id")).json()["peer_id"] == "12D3KooWtest"
            response = await http.get("/v1/find", params={"cpus": 2, "memory": 1024, "gpus": 1, "gpu_model": "a100"})
            assert response.status_code == 200
            assert backend.queries == [FindQuery(cpus=2, memory_bytes=1024, gpus=1, gpu_model="a100")]
            bad = await http.get("/v1/find", params={"cpus": "-1"})
            assert bad.status_code == 400
            assert "cpus" in bad.json()["message"]


@pytest.mark.parametrize("path", ["/v1/id/", "/v1/status//", "/v1/find/"])
async def test_a_trailing_slash_is_a_404_not_a_redirect(api, path):
    url, _ = api
    with trio.fail_after(10):
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with httpx.AsyncClient(base_url=url, headers=headers, trust_env=False) as http:
            response = await http.get(path)
            assert response.status_code == 404, (response.status_code, response.headers)
            assert response.json()["error"]
