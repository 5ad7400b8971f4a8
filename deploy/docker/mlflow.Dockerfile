# syntax=docker/dockerfile:1
# MLflow tracking server with the PostgreSQL driver and the S3 client that the upstream image
# (ghcr.io/mlflow/mlflow) leaves out. Used by deploy/kubernetes/mlflow/mlflow.yaml.
#
#   docker build -f deploy/docker/mlflow.Dockerfile -t REGISTRY/mlflow:3.17.2 deploy/docker
FROM python:3.11.14-slim-bookworm

ARG SOURCE_URL=unknown

LABEL org.opencontainers.image.title="reid-mlflow" \
      org.opencontainers.image.description="MLflow 3.17.2 tracking server with psycopg2 and boto3" \
      org.opencontainers.image.source="${SOURCE_URL}"

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The server's version matches the client pinned in pyproject.toml.
RUN pip install --no-cache-dir mlflow==3.17.2 psycopg2-binary==2.9.13 boto3==1.44.5

RUN groupadd --gid 1000 mlflow \
 && useradd --uid 1000 --gid 1000 --create-home --shell /usr/sbin/nologin mlflow
USER 1000:1000
WORKDIR /home/mlflow

EXPOSE 5000
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]
