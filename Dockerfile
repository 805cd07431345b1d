# One image for the controller, the webhook and the certificate job; each Deployment picks its command
# (kubemcsa-controller, kubemcsa-webhook, python -m certs). Build: docker build -t ghcr.io/admiraltyio/multicluster-service-account:0.6.0 .

FROM python:3.12-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY kubemcsa kubemcsa
COPY controller controller
COPY webhook webhook
COPY certs certs
# Install into a self-contained virtual environment so the final stage copies one directory and no build tools.
RUN python -m venv /opt/venv && /opt/venv/bin/pip install --no-compile . && \
    find /opt/venv -name '__pycache__' -prune -exec rm -rf {} +

FROM python:3.12-slim
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY --from=build /opt/venv /opt/venv
# A numeric non-root user, so runAsNonRoot can be verified by the kubelet without a passwd lookup.
USER 65532:65532
WORKDIR /tmp
# No shell wrapper: the process is PID 1 and handles SIGTERM itself (both servers stop cleanly on it).
ENTRYPOINT []
CMD ["kubemcsa", "--help"]
