# GPU image of esmdist for clusters: NVIDIA's PyTorch container (CUDA, NCCL, cuDNN and its CUDA
# build of torch), with esmdist, DeepSpeed and the s3/wandb extras installed over it. Build
# from the repository root and hand it to Slurm (docs/operations.md, "Containers"):
#   docker build -t esmdist:gpu .
#   enroot import -o esmdist.sqsh dockerd://esmdist:gpu        # Pyxis: esmdist submit --container-image
#   apptainer build esmdist.sif docker-daemon://esmdist:gpu    # Apptainer
# The CPU image (CI, laptops) is docker/cpu.Dockerfile.
FROM nvcr.io/nvidia/pytorch:25.10-py3
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /opt/esmdist
COPY pyproject.toml README.md ./
COPY esmdist esmdist
COPY launcher launcher
COPY configs configs
COPY data data
# The base image's torch is built for its CUDA and NCCL: pin it, so that no requirement
# replaces it with a PyPI wheel.
RUN python -c "import torch; print('torch==' + torch.__version__)" > /tmp/keep-torch.txt \
    && pip install --constraint /tmp/keep-torch.txt -e ".[deepspeed,s3,wandb,eval]" \
    && python -c "import esmdist.pretrain, deepspeed, s3fs, wandb" \
    && rm /tmp/keep-torch.txt
# Node-local JIT cache for DeepSpeed's ops (the job script keeps a TORCH_EXTENSIONS_DIR it is given).
ENV TORCH_EXTENSIONS_DIR=/tmp/esmdist-torch-extensions
CMD ["python", "-m", "esmdist.cli", "--help"]
