"""The offline sharder: FASTA (+ optional cluster membership) → webdataset tar shards, a parquet
shard table and sequence index, and `manifest.json` written last as the commit point.

The format is specified in `shards/README.md`; its contract — file names, versions, the key
hash and split rule — is `esmdist/data/format.py`, shared with the loader that reads it.

Stages (each parallel over processes, each resumable after a crash). Records move between
them as Arrow columns — blocks parsed as arrays, spills as Arrow IPC, grouping by Arrow/numpy
sorts, tar headers filled for all members at once — so that no stage runs Python per record
on regular input:
1. read (`read.py`) — the main process decompresses each input (ISA-L) and cuts it into blocks
   of whole records; workers validate and parse them and spill every record to a partition
   chosen by a keyed hash of its id (and every membership row by the same hash of its member
   id).
2. join (`join.py`) — only with `--clusters` or `--dedupe`, per id partition: duplicate-id
   checks, the membership join, the group key of each record (its cluster, or its sequence
   digest); records are spilled again, by a hash of the group key. Without them a record is
   its own group and its id partition is already its group partition: no second spill.
3. group (`group.py`) — per group partition: samples (a cluster with its members, or one
   sequence), their split and their order, both from the keyed hash of (seed, group key);
   written as one run per split: the samples' texts back to back, their sizes and keys,
   their index rows.
4. shards (`write.py`, `tar.py`) — the runs are cut into shards of `--shard-size` bytes or
   `--shard-samples` samples; each shard's tar is assembled from the runs, hashed and written
   in parallel, under a temporary name, then renamed (local) or uploaded (object storage,
   where an object is visible only once complete).
`run.py` drives them (resume, the work directory's lock, the manifest); `report.py` shows
progress and the final report; `spill.py` is the out-of-core shuffle; `work.py` the work
directory's files.

Memory is bounded by one partition per worker; partitions are sized from the input size.
Bytes of every output depend only on the inputs and options: the order inside a partition
comes from hashes and provenance, never from which worker ran first.
"""

from esmdist.shard.options import ShardError, ShardOptions
from esmdist.shard.report import format_report
from esmdist.shard.run import default_work_dir, run_sharding

__all__ = ["ShardError", "ShardOptions", "default_work_dir", "format_report", "run_sharding"]
