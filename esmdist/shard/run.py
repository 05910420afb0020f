"""A sharding run: its stages in order, each resumable after a crash, one run per work
directory, "already sharded" only for the very same inputs, the manifest written last."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import multiprocessing as mp
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from esmdist.data.format import FORMAT_VERSION, MANIFEST, split_names
from esmdist.data.inputs import FastaError, changed_inputs, input_stat
from esmdist.process import exit_with_parent
from esmdist.shard.group import group_partition
from esmdist.shard.join import join_partition
from esmdist.shard.options import ShardError, ShardOptions
from esmdist.shard.read import read_stage
from esmdist.shard.report import Progress
from esmdist.shard.spill import remove_writer
from esmdist.shard.work import atomic_write, publish_bytes, read_json, remove_partition
from esmdist.shard.write import kept_shard_plans, write_shard, write_shard_table
from esmdist.storage import Store

PARTITION_TARGET_BYTES = 128 << 20


MAX_PARTITIONS = 512


def _partition_count(options: ShardOptions) -> int:
    """From the stored input sizes (compressed inputs counted ×4): deterministic for given
    inputs, independent of the machine and of --workers."""

    estimate = 0
    for path in (*options.inputs, *([options.clusters] if options.clusters else [])):
        try:
            size = input_stat(path)["bytes"]
        except FastaError as exc:
            raise ShardError(str(exc)) from None
        estimate += size * (4 if path.lower().endswith((".gz", ".zst", ".zstd")) else 1)
    return max(1, min(MAX_PARTITIONS, math.ceil(estimate / PARTITION_TARGET_BYTES)))


def default_work_dir(out: str) -> Path:
    store = Store(out)
    if not store.remote:
        return Path(store.root) / "_work"
    name = hashlib.sha256(out.encode()).hexdigest()[:16]
    return Path(os.environ.get("TMPDIR", "/tmp")) / f"esmdist-shard-{name}"


def run_sharding(
    options: ShardOptions, workers: int = 1, work_dir: Path | None = None, keep_work: bool = False,
    restart: bool = False,
) -> dict:  # fmt: skip
    """Shard `options.inputs` into `options.out`; returns the manifest. Resumes a crashed or
    failed run with the same options from its work directory (`restart`: discards it)."""
    if workers < 1:
        raise ValueError("--workers must be at least 1")
    store = Store(options.out)
    identity = options.identity()
    if store.exists(MANIFEST):
        return _already_sharded(options, json.loads(store.read_bytes(MANIFEST)))
    partitions = _partition_count(options)  # every input exists (sizes)
    store.check_writable()  # a read-only --out or refused credentials fail now, not at the end
    work = work_dir or default_work_dir(options.out)
    work.mkdir(parents=True, exist_ok=True)
    with work_lock(work):
        plan_file = work / "plan.json"
        if restart:
            _discard_unfinished(work)
        plan = read_json(plan_file)
        if plan is not None and plan["options"] != identity:
            differ = sorted(k for k in identity if plan["options"].get(k) != identity[k])
            raise ShardError(
                f"{work} holds an unfinished run with other options ({', '.join(differ)}); add "
                "--restart to discard it and start over with these, or rerun with the same"
            )
        if plan is None:
            plan = {"options": identity, "partitions": partitions}
            atomic_write(plan_file, json.dumps(plan, indent=1).encode())
        elif plan["partitions"] != partitions:
            raise ShardError(f"the input sizes changed since the unfinished run in {work} "
                             f"started: delete {work} to start over")  # fmt: skip
        started = time.monotonic()
        (work / "tmp").mkdir(exist_ok=True)
        with _worker_environment():
            read = read_json(work / "stage1.json")
            if read is None:
                read = read_stage(options, partitions, work, workers)
                atomic_write(work / "stage1.json", json.dumps(read).encode())
            elif changed := changed_inputs(_recorded_inputs(read)):
                raise ShardError(f"the inputs changed since the unfinished run in {work} read "
                                 f"them ({'; '.join(changed)}): delete {work} to start over")  # fmt: skip
            rows, joins, groups = _stages_2_to_4(options, partitions, work, workers)
        print(f"finished in {time.monotonic() - started:,.1f} s", file=sys.stderr)
        manifest = _manifest(options, read, joins, groups, rows)
        write_shard_table(store, rows, work)
        publish_bytes(store, json.dumps(manifest, indent=1).encode(), MANIFEST, work)
    if not keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return manifest


def _discard_unfinished(work: Path) -> None:
    """Empty the work directory (keeping its lock file, held by this run)."""
    for entry in work.iterdir():
        if entry.name == "LOCK":
            continue
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _recorded_inputs(read: dict) -> list[dict]:
    """The identities of the FASTA inputs and the cluster table as read (stage 1, manifest)."""
    return [*read["inputs"], *([read["cluster_table"]] if read.get("cluster_table") else [])]


def _already_sharded(options: ShardOptions, manifest: dict) -> dict:
    """The existing manifest when it was made from these options and these inputs, as they
    are now; else ShardError saying what differs."""
    if manifest.get("options") != options.identity():
        raise ShardError(f"{options.out} already holds a sharded dataset made with other "
                         "options; choose another --out or delete it")  # fmt: skip
    changed = changed_inputs(_recorded_inputs(manifest))
    if changed:
        raise ShardError(
            f"{options.out} holds shards of other versions of the inputs ({'; '.join(changed)}): "
            "delete it or choose another --out to shard them as they are now"
        )
    print(f"{options.out}: already sharded with these options", file=sys.stderr)
    return manifest


@contextlib.contextmanager
def work_lock(work: Path) -> Iterator[None]:
    """One sharding run per work directory: a second one would write the same spills and runs.
    An OS file lock, released by the kernel when its holder exits, however it exits."""
    import fcntl

    with open(work / "LOCK", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise ShardError(f"another esmdist shard (pid {holder}) is running on {work}; wait "
                             "for it, or give this run another --out or --work-dir") from None  # fmt: skip
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield


def _stages_2_to_4(options: ShardOptions, partitions: int, work: Path, workers: int):
    """(shard rows, join results, group results), each stage resuming where a crash left it.
    What a finished step leaves behind that no later step reads (a partition's spill once it is
    grouped, a run once every shard cut from it is written) is deleted at once: most of it then
    never reaches the disk, and the work directory peaks lower."""
    spill1 = [work / "spill1" / kind for kind in ("records", "members")]
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"),
                             initializer=exit_with_parent, initargs=(os.getpid(),)) as pool:  # fmt: skip
        joins = []
        if options.needs_join:  # else a record's id partition is already its group partition
            joins = _resumable_stage(pool, work / "stage2", "join", range(partitions),
                                     lambda p: pool.submit(join_partition, options, partitions,
                                                           str(work), p),
                                     lambda p: remove_writer(work / "spill2", f"j{p}"),
                                     lambda p, _: remove_partition(spill1, p))  # fmt: skip
        grouped_from = [work / "spill2"] if options.needs_join else spill1
        groups = _resumable_stage(pool, work / "stage3", "group", range(partitions),
                                  lambda p: pool.submit(group_partition, options, str(work), p),
                                  done=lambda p, _: remove_partition(grouped_from, p))  # fmt: skip
        plans = {plan.name: plan for plan in kept_shard_plans(options, partitions, work)}
        readers = Counter((part, plan.split) for plan in plans.values()
                          for part, _, _ in plan.pieces)  # fmt: skip
        progress = Progress("shards")

        def shard_done(name: str, row: dict) -> None:
            progress.update(records=row["samples"])
            for part, _, _ in plans[name].pieces:
                readers[part, plans[name].split] -= 1
                if readers[part, plans[name].split] == 0:
                    for path in work.glob(f"runs/q{part:05d}.{plans[name].split}.*"):
                        path.unlink()

        rows = _resumable_stage(pool, work / "done", "shard", list(plans),
                                lambda name: pool.submit(write_shard, options, str(work),
                                                         plans[name]),
                                done=shard_done)  # fmt: skip
        progress.finish()
    return rows, joins, groups


@contextlib.contextmanager
def _worker_environment() -> Iterator[None]:
    """Worker processes started inside get their large buffers on transparent huge pages:
    Arrow's allocator (mimalloc) and glibc's malloc ask for them only when told, and first
    touching fresh memory page by page cost more than the work done on it (a fresh 400 MB Arrow
    result: 1.0 s in 4 KB pages, 0.23 s in huge pages — docs/PERFORMANCE.md). The variables
    are read when a process starts, so they are set for the children and restored after."""
    saved = {name: os.environ.get(name) for name in ("MIMALLOC_ALLOW_LARGE_OS_PAGES",
                                                     "GLIBC_TUNABLES")}  # fmt: skip
    os.environ.setdefault("MIMALLOC_ALLOW_LARGE_OS_PAGES", "1")
    tunables = saved["GLIBC_TUNABLES"] or ""
    if "glibc.malloc.hugetlb" not in tunables:
        os.environ["GLIBC_TUNABLES"] = ":".join(filter(None, [tunables, "glibc.malloc.hugetlb=1"]))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _resumable_stage(
    pool, folder: Path, label, parts, submit, before=None, done=None
) -> list[dict]:
    """Run `submit(part)` for every part without a result file; return all results in order.
    `done(part, result)` runs once a part's result is on disk."""
    folder.mkdir(parents=True, exist_ok=True)
    futures = {}
    for part in parts:
        if not (folder / f"{part}.json").exists():
            if before is not None:
                before(part)
            futures[part] = submit(part)
    parts_of = {future: part for part, future in futures.items()}
    try:
        # As each finishes, not in order: a part done but not yet recorded is redone on resume.
        for future in as_completed(parts_of):
            part, result = parts_of[future], future.result()
            atomic_write(folder / f"{part}.json", json.dumps(result).encode())
            if done is not None:
                done(part, result)
    except FastaError as exc:
        raise ShardError(str(exc)) from None
    except Exception as exc:
        if isinstance(exc, ShardError):
            raise
        raise ShardError(f"{label} stage failed: {type(exc).__name__}: {exc}; rerun the same "
                         "command to resume") from exc  # fmt: skip
    return [json.loads((folder / f"{part}.json").read_text()) for part in parts]


def _manifest(options, read, joins, groups, rows) -> dict:
    skipped = Counter(read["read"]["skipped"])
    for result in (*joins, *groups):
        skipped.update(result["skipped"])
    per_split = {}
    for split in split_names(options.splits):
        mine = [r for r in rows if r["split"] == split]
        per_split[split] = {
            "shards": len(mine),
            "samples": sum(r["samples"] for r in mine),
            "sequences": sum(r["sequences"] for r in mine),
            "residues": sum(r["residues"] for r in mine),
        }
    histogram = read["length_log2_histogram"]
    return {
        "format_version": FORMAT_VERSION,
        "options": options.identity(),
        "inputs": read["inputs"],
        "cluster_table": read.get("cluster_table"),
        "counts": {
            "records_read": read["read"]["records"] + sum(read["read"]["skipped"].values()),
            "sequences": sum(s["sequences"] for s in per_split.values()),
            "samples": sum(s["samples"] for s in per_split.values()),
            "residues": sum(s["residues"] for s in per_split.values()),
            "skipped": dict(sorted(skipped.items())),
            "normalised": read["read"]["normalised"],
            "splits": per_split,
        },
        "length_histogram": {
            "bins": "log2: bin b holds lengths in [2^(b-1), 2^b)",
            "counts": histogram,
        },
        "length": {
            "min": min(r["min_length"] for r in rows),
            "max": max(r["max_length"] for r in rows),
            "mean": round(
                sum(s["residues"] for s in per_split.values())
                / max(1, sum(s["sequences"] for s in per_split.values())),
                3,
            ),
        },
        "shards": [r["name"] for r in rows],
    }
