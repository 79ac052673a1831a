# velium-server and the velium client in a small image.
#   docker build -t velium-server .
#   docker run --rm -p 12345:12345/tcp -p 12345:12345/udp --ulimit nofile=1048576:1048576 \
#     velium-server velium-server --listen 0.0.0.0:12345
# (deploy/README.md: containers, io_uring and seccomp; deploy/cluster/compose.yaml: three
# nodes and a nats-server.)
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin velium-server --bin velium

FROM debian:bookworm-slim
# ca-certificates: the system roots `velium --tls` checks a public CA's certificate with.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/velium-server /src/target/release/velium /usr/local/bin/
COPY deploy/velium-server.toml /etc/velium/velium-server.toml
RUN useradd --system --no-create-home --shell /usr/sbin/nologin velium
USER velium
EXPOSE 12345/tcp 12345/udp 9100/tcp
CMD ["velium-server", "--config", "/etc/velium/velium-server.toml"]
