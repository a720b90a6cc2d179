"""Helpers for the backend API (PROTOCOL.md 11) in tests: the key and JSON requests."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from conftest import SCALE, Daemon

KEY = "test-api-key-" + "fedcba9876543210" * 3


def call(daemon: Daemon, method: str, path: str, body: Any = None, *,
         key: str | None = KEY, token: str | None = None,
         base: str | None = None) -> tuple[int, Any]:
    """One HTTP request with a JSON body; (status, decoded JSON answer or None). ``base``:
    another listener than the daemon's main one (``http://127.0.0.1:PORT``)."""
    headers = {"Content-Type": "application/json"}
    bearer = token if token is not None else key
    if bearer is not None:
        headers["Authorization"] = f"Bearer {bearer}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request((base or daemon.http) + path, data=data, method=method,
                                     headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5 * SCALE) as response:
            raw = response.read()
            return response.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        return exc.code, json.loads(raw) if raw else None


def put_pitch(daemon: Daemon, pitch_id: int, owner: int, *, private: bool = False,
              allowed: list[int] | None = None, title: str = "A pitch") -> None:
    status, body = call(daemon, "PUT", f"/api/pitches/{pitch_id}", {
        "ownerId": owner, "title": title, "visibility": "private" if private else "public",
        "allowedUserIds": allowed or []})
    assert status == 200, body
