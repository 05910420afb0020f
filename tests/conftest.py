"""Shared fixtures: the bundled real sequences and the shared data collection."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_SESSION: dict[str, int] = {}


def pytest_sessionfinish(session, exitstatus) -> None:
    _SESSION["status"] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config) -> None:
    """This test process ends as esmdist's own do (esmdist.process.exit_process): its results
    are reported by now, and the interpreter's finalization — where a library's native thread
    calling back into Python can abort a process whose work is done — is skipped."""
    if "status" not in _SESSION:
        return
    from esmdist.process import exit_process

    with contextlib.suppress(AttributeError, OSError, ValueError):
        config.get_terminal_writer().flush()
    exit_process(_SESSION["status"])


DEMO_FASTA = REPO / "data" / "demo_4k.fasta"
EVAL_DATA = REPO / "data" / "eval"
TEST_DATA = Path(__file__).resolve().parent / "data"


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
    from esmdist.testing.s3server import SeaweedS3

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


def make_shards(folder: Path, records, shard_samples: int, valid: float = 0.05) -> Path:
    """Shard `records` (real (header, sequence) pairs) into `folder/shards`."""
    from esmdist.shard import ShardOptions, run_sharding

    source = folder / "in.fasta"
    source.write_text("".join(f">{h}\n{s}\n" for h, s in records))
    out = folder / "shards"
    splits = (("valid", valid),) if valid else ()
    options = ShardOptions(inputs=(str(source),), out=str(out), shard_bytes=None,
                           shard_samples=shard_samples, splits=splits)  # fmt: skip
    run_sharding(options, workers=2)
    return out
