"""Shared fixtures: the bundled real sequences and the shared data collection."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO_FASTA = REPO / "data" / "demo_4k.fasta"
SHARED_DATA = Path(os.environ.get("ESMDIST_SHARED_DATA", REPO.parent / "shared" / "data"))


def read_fasta(path: Path) -> list[tuple[str, str]]:
    """A plain reader for tests, independent of the code under test."""
    records: list[tuple[str, str]] = []
    header, chunks = None, []
    for line in path.read_text().splitlines():
        if line.startswith(">"):
            if header is not None:
                records.append((header, "".join(chunks)))
            header, chunks = line[1:], []
        else:
            chunks.append(line.strip())
    if header is not None:
        records.append((header, "".join(chunks)))
    return records


@pytest.fixture(scope="session")
def demo_records() -> list[tuple[str, str]]:
    return read_fasta(DEMO_FASTA)


@pytest.fixture(scope="session")
def real_sequences(demo_records) -> list[str]:
    """A varied handful of real sequences: short, medium and long, a non-standard residue."""
    by_length = sorted((s for _, s in demo_records), key=len)
    picks = [by_length[0], by_length[len(by_length) // 3], by_length[len(by_length) // 2]]
    picks.append(next(s for s in by_length if "X" in s and len(s) < 300))
    return picks


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A SeaweedFS S3 server on 127.0.0.1 for the whole session."""
    from tests.s3server import SeaweedS3

    server = SeaweedS3(tmp_path_factory.mktemp("s3") / "data")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """The AWS variables of the test server in this process's environment (restored after)."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server.env()
