"""Fixtures of the in-process app tests: the tiny run's artifacts in an inbox, its backbone,
and settings for an app over them. Registered as a pytest plugin (tests/conftest.py)."""

from __future__ import annotations

import pytest

import lpi
from tests.server_helpers import export_artifacts, settings


@pytest.fixture(scope="module")
def artifacts(tiny_runs, tmp_path_factory):
    inbox = tmp_path_factory.mktemp("inbox")
    return inbox, export_artifacts(tiny_runs, inbox)


@pytest.fixture(scope="module")
def backbone(tiny_runs):
    return lpi.load_backbone(tiny_runs / "backbone.safetensors")


@pytest.fixture
def app_settings(tiny_runs, artifacts, tmp_path):
    inbox, _ = artifacts
    return lambda **kw: settings(tiny_runs, tmp_path / "data", inbox, **kw)


def relative(path, inbox) -> str:
    return str(path.relative_to(inbox))


async def load(client, task, path, inbox, **extra):
    response = await client.put(f"/tasks/{task}", json={"path": relative(path, inbox), **extra})
    assert response.status_code == 200, response.text
    return response.json()
