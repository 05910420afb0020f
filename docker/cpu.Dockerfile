# CPU image of esmdist (CI, laptops, CPU-only nodes): the same setup script as a developer
# machine (torch pinned to the CPU wheel first), then the CLI. Build from the repository root:
#   docker build -f docker/cpu.Dockerfile -t esmdist:cpu .
FROM python:3.11-slim
# git: setup.sh installs the project editable, which reads its version control metadata.
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/esmdist
COPY . .
RUN bash scripts/setup.sh s3,wandb,eval
ENV PATH=/opt/esmdist/.venv/bin:$PATH
ENTRYPOINT ["esmdist"]
CMD ["--help"]
