"""Fixtures of the adversarial suite: real shards and one real run's checkpoints to tamper with."""

from __future__ import annotations

import pytest

from tests.adversarial.helpers import job
from tests.conftest import make_shards


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory, demo_records):
    return make_shards(tmp_path_factory.mktemp("adversarial"), demo_records[:600], 100)


@pytest.fixture(scope="session")
def trained(small_shards, tmp_path_factory):
    """A finished 4-step single-process run with committed step_000000002 and _000000004."""
    from esmdist.train import train

    base = tmp_path_factory.mktemp("trained")
    train(job(small_shards, base / "out", str(base / "root")))
    return base / "root"
