# One image for the controller, the webhook and the certificate job; each Deployment picks its command
# (kubemcsa-controller, kubemcsa-webhook, python -m certs). The manifests name it multicluster-service-account:0.6.0
# with no registry: build it with that tag, push it where your clusters pull from, and point the manifests there:
#   docker build -t multicluster-service-account:0.6.0 .
#   docker tag multicluster-service-account:0.6.0 REGISTRY/multicluster-service-account:0.6.0 && docker push ...
#   (cd manifests && kustomize edit set image multicluster-service-account=REGISTRY/multicluster-service-account:0.6.0)
# No registry of this project's own publishes it.
#
# Base image: python:3.12-slim (Debian) for both stages. The final stage runs the virtual environment built in the
# first, so both need the same interpreter at the same path (/usr/local/bin/python3.12); distroless Python images
# ship another version at another path. Only what production runs is copied: the venv, without pip, without the
# in-memory API server (kubemcsa_testing is excluded by .dockerignore) and without the test-only dependencies
# (the `test` extra is not installed). tests/test_image.py checks what this file copies and installs.

FROM python:3.12-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY kubemcsa kubemcsa
COPY controller controller
COPY webhook webhook
COPY certs certs
# A self-contained virtual environment without pip (the build stage's pip installs into it), so the final stage
# copies one directory and no build tools. Byte code is compiled here, once: the read-only root filesystem stops
# Python from caching it at run time, and every start would compile the kubernetes client again.
RUN python -m venv --without-pip /opt/venv && \
    pip --python /opt/venv/bin/python install --no-compile . && \
    python -m compileall -q --invalidation-mode unchecked-hash /opt/venv/lib

FROM python:3.12-slim
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# Production never installs anything: remove the base image's pip as well.
RUN python -m pip uninstall --yes --quiet pip
COPY --from=build /opt/venv /opt/venv
# A numeric non-root user, so runAsNonRoot can be verified by the kubelet without a passwd lookup.
USER 65532:65532
# Nothing is written at run time: the root filesystem is read-only in every manifest, and no /tmp is needed.
WORKDIR /
# No shell wrapper: the process is PID 1 and handles SIGTERM itself (both servers stop cleanly on it).
ENTRYPOINT []
CMD ["kubemcsa", "--help"]
