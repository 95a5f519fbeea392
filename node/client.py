"""A small client of the local API, used by the CLI and by scripts.

``Client.from_data_dir()`` reads api.json (URL and token) from the node's data dir.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx

from node.config import API_FILE, default_data_dir


class ApiError(Exception):
    """The local API answered with an error, or could not be reached. The message says which and why."""


class Client:
    """Synchronous client of one node's local API."""

    def __init__(self, url: str, token: str, *, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=timeout, trust_env=False
        )

    @classmethod
    def from_data_dir(cls, data_dir: Path | None = None, **kwargs: Any) -> Client:
        path = (data_dir or default_data_dir()) / API_FILE
        try:
            info = json.loads(path.read_text())
            return cls(info["url"], info["token"], **kwargs)
        except FileNotFoundError:
            raise ApiError(f"no running node found: {path} does not exist (start one with `node start`)") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ApiError(f"cannot read {path}: {exc}") from exc

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _get(self, path: str, params: dict[str, Any] | None = None) -> Any:
        try:
            response = self._http.get(f"/v1/{path}", params=params)
        except httpx.TransportError as exc:
            raise ApiError(f"cannot reach the node's API at {self.url}: {exc} (is `node start` running?)") from exc
        if response.status_code != 200:
            try:
                detail = response.json().get("message", response.text)
            except ValueError:
                detail = response.text
            raise ApiError(f"{response.status_code} from {path}: {detail}")
        return response.json()

    def id(self) -> dict[str, Any]:
        return self._get("id")  # type: ignore[no-any-return]

    def peers(self) -> list[dict[str, Any]]:
        return self._get("peers")["peers"]  # type: ignore[no-any-return]

    def status(self) -> dict[str, Any]:
        return self._get("status")  # type: ignore[no-any-return]

    def find(self, *, cpus: int = 1, memory_bytes: int = 0, gpus: int = 0, gpu_model: str = "") -> list[dict[str, Any]]:
        params = {"cpus": cpus, "memory": memory_bytes, "gpus": gpus, "gpu_model": gpu_model}
        return self._get("find", params)["providers"]  # type: ignore[no-any-return]
