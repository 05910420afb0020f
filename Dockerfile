# CPU image of esmdist: the same setup script as a developer machine, then the CLI.
# GPU images: start from an NVIDIA PyTorch base instead and skip the CPU torch pin
# (scripts/setup.sh keeps an already-installed torch).
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/esmdist
COPY . .
RUN bash scripts/setup.sh s3,wandb
ENV PATH=/opt/esmdist/.venv/bin:$PATH
ENTRYPOINT ["esmdist"]
CMD ["--help"]
