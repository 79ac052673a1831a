# velium-server and the velium client in a small image.
#   docker build -t velium-server .
#   docker run --rm -p 12345:12345/tcp -p 12345:12345/udp --ulimit nofile=1048576:1048576 \
#     velium-server
# The image's /etc/velium/velium-server.toml is deploy/velium-server.toml (every setting at
# its default: listen on 0.0.0.0:12345, no admin listener); mount your own over it with
# -v /etc/velium:/etc/velium:ro. To reach the admin listener (9100) from the host, set
# admin = "0.0.0.0:9100" in that file and publish it on the host's loopback only:
# -p 127.0.0.1:9100:9100.
#
# io_uring and seccomp: Docker's default seccomp profile blocks io_uring_setup,
# io_uring_enter and io_uring_register (since Docker 25.0; containerd's default profile
# too). With the default io = "auto" (--io auto) the server then falls back to epoll,
# with one warning in the log, and serves the same protocol. For io_uring, run the
# container with a profile that allows those three calls:
# --security-opt seccomp=velium-seccomp.json (deploy/README.md, "io_uring, seccomp and
# containers", shows how to make one from Docker's default profile).
#
# (deploy/cluster/compose.yaml: three nodes and a nats-server.)
FROM rust:bookworm AS build
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
# An unprivileged system user: the ports are above 1024, and the server writes no files.
RUN useradd --system --no-create-home --shell /usr/sbin/nologin velium
USER velium
# The shims' port, TCP and UDP (listen), and the admin listener's (admin, off by default).
EXPOSE 12345/tcp 12345/udp 9100/tcp
CMD ["velium-server", "--config", "/etc/velium/velium-server.toml"]
