# The operator image: the job contract and the controller (kopf), no torch. Build from the repository root:
#   docker build -t ghcr.io/longcat-i2v/operator:0.1.0 .
# One stage, as the trainer's (trainer_image/Dockerfile says why).
FROM python:3.11-slim-bookworm
WORKDIR /src
# The dependencies first, in a layer of their own (no code yet: setuptools finds no packages), so that a code
# change rebuilds only the last layers.
COPY pyproject.toml constraints.txt ./
# pyproject.toml names the README; its text is not needed to install the dependencies (nor does an edit of it
# rebuild them): the real one comes with the code.
RUN touch README.md \
    && python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir -c constraints.txt ".[operator]"
# operator/ holds longcat_job and longcat_operator; the trainer's package is not part of this image.
COPY README.md ./
COPY operator ./operator
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps --force-reinstall . \
    && rm -rf /src
WORKDIR /
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# The chart runs it with a read-only root filesystem as this user.
USER 10001:10001
# /metrics (LONGCAT_OPERATOR_METRICS_PORT) and kopf's /healthz (--liveness).
EXPOSE 8000 8080
ENTRYPOINT ["python", "-m", "longcat_operator"]
CMD ["--standalone", "--all-namespaces", "--liveness=http://0.0.0.0:8080/healthz"]
