"""The trainer's entry point: `python -m esmdist.pretrain --config …` (what the Slurm job runs on
every rank) and `launcher/pretrain.py` (for torchrun, deepspeed and plain python).

Importing it starts remembering stop signals before torch is imported (seconds): a SIGUSR1 /
SIGTERM / SIGINT from then on is a stop request, not the signal's default death, which Slurm
would not requeue.
"""

import sys

from esmdist.signals import install_early

install_early()

from esmdist.launch import main  # noqa: E402
from esmdist.process import run_entry_point  # noqa: E402


def run() -> None:
    """The trainer's process from start to exit status (esmdist.process.exit_process)."""
    run_entry_point("pretrain", lambda: main(sys.argv[1:]))


if __name__ == "__main__":
    run()
