"""Pretraining entry point. Works as:

deepspeed --num_gpus 8 launcher/pretrain.py --config configs/esm2_650M.toml
torchrun --nproc_per_node 8 launcher/pretrain.py --config configs/esm2_650M.toml
srun python launcher/pretrain.py --config configs/esm2_650M.toml
python launcher/pretrain.py --config configs/debug-cpu.toml --train.max_steps=50

(`python -m esmdist.pretrain` is the same entry point without the path.)
"""

# Installs the stop-signal handlers before torch is imported (see esmdist/pretrain.py).
from esmdist.pretrain import run

if __name__ == "__main__":
    run()
