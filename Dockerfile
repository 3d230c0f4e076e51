# kubehv: one image for the node agent and the cluster controller (entrypoint `kubehv`).
#   docker build -t kubehv:dev .
#   agent:      kubehv agent --node-name=$(NODE_NAME) ...      (runs as root: see below)
#   controller: kubehv controller ...                           (runs as uid 65532)
#
# Stage 1 builds wheels for exactly the pinned set in requirements.lock; libvirt-python has
# no wheel on PyPI and compiles against libvirt-dev, which must not ship in the runtime.

FROM python:3.11-slim-bookworm AS builder
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential pkg-config libvirt-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY requirements.lock ./
RUN pip wheel --no-cache-dir --wheel-dir /wheels -r requirements.lock
COPY pyproject.toml README.md ./
COPY kubehv ./kubehv
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# Stage 2: slim runtime with only the libvirt client library (libvirt0) and virsh
# (libvirt-clients: `kubehv console` runs it in the agent pod), no compiler.
FROM python:3.11-slim-bookworm
RUN apt-get update \
 && apt-get install -y --no-install-recommends libvirt0 libvirt-clients \
 && rm -rf /var/lib/apt/lists/*
COPY --from=builder /wheels /wheels
COPY requirements.lock /tmp/requirements.lock
# --no-index: only the wheels built above from the lock file, nothing fetched at this point.
RUN pip install --no-cache-dir --no-index --find-links /wheels -r /tmp/requirements.lock \
 && pip install --no-cache-dir --no-index --no-deps --find-links /wheels kubehv \
 && rm -rf /wheels /tmp/requirements.lock
# Non-root by default: the controller needs nothing of the host. The agent's DaemonSet sets
# runAsUser: 0 because libvirtd's socket authorises root only; it still drops every
# capability (manifests/base/agent.yaml documents each privilege).
RUN useradd --system --uid 65532 --user-group --no-create-home --shell /usr/sbin/nologin kubehv
USER 65532:65532
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
EXPOSE 9100 8081 9443
ENTRYPOINT ["kubehv"]
CMD ["--help"]
