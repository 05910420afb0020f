"""Slurm jobs: the job scripts (pretrain.sbatch, shard.sbatch, also reachable as
slurm/pretrain.sbatch and shards/shard.sbatch) and `esmdist submit`, which renders them with
the #SBATCH lines of its options and hands them to sbatch."""
