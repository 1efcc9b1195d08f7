# The serving endpoint: `fedlearn serve`, OIP v2 over REST (8000, with /metrics) and gRPC
# (8001), TLS on both. The core plus the serving stack (`fedlearn[serve]`); torch is the CPU
# build.
#   docker build -f deploy/docker/endpoint.Dockerfile -t fedlearn-endpoint .
# Mounts: /var/lib/fedlearn/registry (the registry it serves and watches), /etc/fedlearn/tls
# (server.pem, server.key).
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG FEDLEARN_EXTRAS=serve
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

RUN pip install --index-url "$TORCH_INDEX" torch==2.13.0
WORKDIR /app
COPY pyproject.toml README.md /src/
COPY fedlearn /src/fedlearn
RUN pip install "/src[${FEDLEARN_EXTRAS}]" && rm -rf /src
# the registered model builders the registry names (clients.tabular:build_model)
COPY clients /app/clients

RUN useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin fedlearn \
    && mkdir -p /etc/fedlearn/tls /var/lib/fedlearn/registry \
    && chown -R 10001:10001 /etc/fedlearn /var/lib/fedlearn
USER 10001
EXPOSE 8000 8001
ENTRYPOINT ["fedlearn"]
CMD ["serve", "--registry", "/var/lib/fedlearn/registry", "--path", "/app", \
     "--host", "0.0.0.0", "--http-port", "8000", "--grpc-port", "8001", \
     "--cert", "/etc/fedlearn/tls/server.pem", "--key", "/etc/fedlearn/tls/server.key"]
