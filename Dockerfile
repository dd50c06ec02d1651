# syntax=docker/dockerfile:1
#
# The fanout image: `docker build -t fanout .` (BuildKit, the default builder since Docker 23).
#
# - Built with the official Rust image; the dependencies are compiled once and kept between
#   builds in BuildKit cache mounts (registry and target/), so a change to src/ rebuilds
#   only fanout itself.
# - Runs on distroless cc-debian12: glibc and libgcc and nothing else (no shell, no package
#   manager), built from the same Debian release as the build stage. fanout needs no TLS
#   library: it links only glibc.
# - Runs as uid/gid 10001, as k8s/ and helm/ expect (runAsUser: 10001), and writes nothing:
#   a read-only root filesystem is fine.
# - HEALTHCHECK: distroless has no curl or wget, so the probe is busybox's wget, copied
#   alone from Debian's statically linked busybox (2 MB). Named `wget`, busybox runs only
#   its wget applet (this build's -T option crashes: HEALTHCHECK --timeout bounds the
#   probe instead). It probes GET /healthz (liveness: the process answers), not
#   /readyz: a restart cannot bring Redis back, and routing by readiness is the load
#   balancer's job (examples/compose/haproxy.cfg checks /readyz; Kubernetes uses its own
#   probes and ignores HEALTHCHECK). It assumes the default FANOUT_INTERNAL_LISTEN port:
#   with another one, override the healthcheck (compose: `healthcheck.test`).
#
# Ports: 3000 public (Socket.IO, REST history), 3001 internal (ingest, /metrics, /healthz,
# /readyz). Stop with SIGTERM and allow FANOUT_SHUTDOWN_TIMEOUT (10 s) plus a margin:
# `docker stop -t 15`, `stop_grace_period: 15s` in compose.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS build
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends busybox-static \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# What `cargo build -p fanout` reads: the workspace manifests (loadtest/ and fuzz/ are members), the
# lock file, the sources, benches/ (declared in Cargo.toml), the vendored engine (patched in
# by Cargo.toml) and testkit/ (a member, and fanout's dev-dependency: Cargo loads its
# manifest and needs its src/ to find its library), and the example dashboard the binary
# embeds. .dockerignore keeps the rest out of the build context.
COPY Cargo.toml Cargo.lock ./
COPY loadtest/Cargo.toml loadtest/Cargo.toml
COPY fuzz/Cargo.toml fuzz/Cargo.toml
COPY testkit testkit
COPY vendor vendor
COPY benches benches
COPY src src
COPY examples/dashboard examples/dashboard
# target/ is a cache mount, so the binary is copied out in the same step. Debug info is
# stripped (the release profile keeps line tables for local profiling): 59 MB -> 11 MB.
# Symbols stay, so backtraces and perf still name functions.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    CARGO_PROFILE_RELEASE_STRIP=debuginfo cargo build --release --locked -p fanout \
    && install -D -m 0755 target/release/fanout /out/fanout \
    && install -D -m 0755 /bin/busybox /out/wget

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/fanout /usr/local/bin/fanout
COPY --from=build /out/wget /usr/local/bin/wget
USER 10001:10001
EXPOSE 3000 3001
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/wget", "-q", "-O", "/dev/null", "http://127.0.0.1:3001/healthz"]
ENTRYPOINT ["/usr/local/bin/fanout"]
CMD ["serve"]
