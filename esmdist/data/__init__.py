"""Data: FASTA reading and validation, the training stream (sample order, shard reader, loader,
crop/mask/pack). The offline sharder that writes the shards is `esmdist.shard`."""
