# The coordinator: `fedlearn server`. The core plus report plots (`fedlearn[report]`); no
# serving stack; torch is the CPU build.
#   docker build -f deploy/docker/coordinator.Dockerfile -t fedlearn-coordinator .
# Mounts: /etc/fedlearn/coordinator.toml (config), /etc/fedlearn/tls (server.pem,
# server.key), /etc/fedlearn/allowlist/sites.toml (enrolled sites, re-read when it changes),
# /var/lib/fedlearn/state (run store, model, report) and /var/lib/fedlearn/registry. The
# compose demo also runs its enrollment step (certs dev, keys generate, keys enroll) in it.
# Ports: 7443 (gRPC, sites dial in), 9464 (Prometheus /metrics).
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG FEDLEARN_EXTRAS=report
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

RUN pip install --index-url "$TORCH_INDEX" torch==2.13.0
WORKDIR /app
COPY pyproject.toml README.md /src/
COPY fedlearn /src/fedlearn
RUN pip install "/src[${FEDLEARN_EXTRAS}]" && rm -rf /src
# the model factories the config names (clients.tabular:initial_breast_cancer, build_model)
COPY clients /app/clients

RUN useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin fedlearn \
    && mkdir -p /etc/fedlearn/tls /etc/fedlearn/ca /etc/fedlearn/keys /etc/fedlearn/allowlist \
       /var/lib/fedlearn/state /var/lib/fedlearn/registry \
    && chown -R 10001:10001 /etc/fedlearn /var/lib/fedlearn
USER 10001
EXPOSE 7443 9464
ENTRYPOINT ["fedlearn"]
CMD ["server", "--config", "/etc/fedlearn/coordinator.toml"]
