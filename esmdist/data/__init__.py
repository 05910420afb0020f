"""Data: FASTA reading and validation, the offline sharder, the training stream."""
