"""Pretraining entry point. Works as:

deepspeed --num_gpus 8 launcher/pretrain.py --config configs/esm2_650M.toml
torchrun --nproc_per_node 8 launcher/pretrain.py --config configs/esm2_650M.toml
srun python launcher/pretrain.py --config configs/esm2_650M.toml
python launcher/pretrain.py --config configs/debug-cpu.toml --train.max_steps=50
"""

import sys

from esmdist.signals import install_early

# Before torch is imported (seconds): a SIGUSR1/SIGTERM/SIGINT from now on is a stop request.
install_early()

from esmdist.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
