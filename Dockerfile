# The operator image: kopf and the job API, no torch. Build from the repository root:
#   docker build -t ghcr.io/longcat-i2v/operator:0.1.0 .
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
# setuptools finds both packages (pyproject.toml), so both trees are copied; only the operator extra is installed.
COPY pyproject.toml constraints.txt README.md ./
COPY operator ./operator
COPY trainer_image ./trainer_image
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir -c constraints.txt ".[operator]"

FROM python:3.11-slim-bookworm
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# The chart runs it with a read-only root filesystem as this user.
USER 10001:10001
# /metrics (LONGCAT_OPERATOR_METRICS_PORT) and kopf's /healthz (--liveness).
EXPOSE 8000 8080
ENTRYPOINT ["python", "-m", "longcat_operator"]
CMD ["--standalone", "--all-namespaces", "--liveness=http://0.0.0.0:8080/healthz"]
