# A site daemon: `fedlearn client`. The core install only (`fedlearn[site]`): no serving,
# report plots or scikit-learn; torch is the CPU build.
#   docker build -f deploy/docker/site.Dockerfile -t fedlearn-site .    (from the repository root)
# Mounts: /etc/fedlearn/site.toml (config), /etc/fedlearn/keys/site.key (the site's Ed25519
# key), /etc/fedlearn/ca/ca.pem (the CA of the coordinator's certificate), /data (its data).
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# extras on top of the core; the compose demo adds "datasets" for its bundled data set
ARG FEDLEARN_EXTRAS=site
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

RUN pip install --index-url "$TORCH_INDEX" torch==2.13.0
WORKDIR /app
COPY pyproject.toml README.md /src/
COPY fedlearn /src/fedlearn
RUN pip install "/src[${FEDLEARN_EXTRAS}]" && rm -rf /src
# the example client apps the configs name (clients.tabular:make_app); a real site copies
# its own package here instead
COPY clients /app/clients

RUN useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin fedlearn \
    && mkdir -p /etc/fedlearn/keys /etc/fedlearn/ca /data \
    && chown -R 10001:10001 /etc/fedlearn /data
USER 10001
ENTRYPOINT ["fedlearn"]
CMD ["client", "--config", "/etc/fedlearn/site.toml"]
