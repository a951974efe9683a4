# syntax=docker/dockerfile:1
# One image per component the charts run, each binary its image's entrypoint so the
# charts' `args` work unchanged:
#   ghcr.io/cluster-tunnel/tunnel-{server,agent,sidecar,injector,manager}:<appVersion>
# The binaries are built beforehand, once, by `cargo build --release --locked`;
# `scripts/build-images` does both steps and tags every image (docs/images.md).
# Build one by hand from the repository root (default target dir):
#   docker build --target tunnel-server --build-arg VERSION=0.1.0 \
#     --build-arg REVISION=$(git rev-parse HEAD) -t ghcr.io/cluster-tunnel/tunnel-server:0.1.0 .
# `Dockerfile.build` is the multi-stage variant that compiles inside a pinned Rust image.

# glibc of bookworm (the binaries link against glibc 2.36 or older); no shell is needed.
ARG BASE_IMAGE=debian:bookworm-slim

FROM ${BASE_IMAGE} AS runtime
ARG VERSION=unknown
ARG REVISION=unknown
LABEL org.opencontainers.image.source="https://github.com/cluster-tunnel/cluster-tunnel" \
      org.opencontainers.image.url="https://github.com/cluster-tunnel/cluster-tunnel" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="cluster-tunnel" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"
# An image imported from a root filesystem has no PATH; the injector's exec probes
# (`tunnel-sidecar probe readyz`) find the binary through it.
ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# glibc's memcpy without `rep movsb` for large copies: every byte the tunnel carries is copied
# into and out of rustls in user space, and on the x86 VMs measured `rep movsb` made those copies
# the largest single cost; with this setting the sidecar-port path took a quarter less CPU per GB
# and a quarter more throughput on one stream (docs/benchmark.md). Ignored on other
# architectures; override or unset it in the pod spec to compare.
ENV GLIBC_TUNABLES=glibc.cpu.x86_rep_movsb_threshold=4294967295
# The system's TLS roots (slim and minbase bases have none): `scripts/build-images` puts the
# build host's bundle next to the binaries; by hand, copy /etc/ssl/certs/ca-certificates.crt
# to target/release/ first.
COPY --chmod=0644 target/release/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
# The charts run every container as 65532:65532 with runAsNonRoot, which needs a numeric user.
USER 65532:65532
WORKDIR /

FROM runtime AS tunnel-server
LABEL org.opencontainers.image.title="tunnel-server" \
      org.opencontainers.image.description="cluster-tunnel proxy server: accepts agents' reverse tunnels and clients' connections"
COPY --chmod=0755 target/release/tunnel-server /usr/local/bin/tunnel-server
ENTRYPOINT ["/usr/local/bin/tunnel-server"]

FROM runtime AS tunnel-agent
LABEL org.opencontainers.image.title="tunnel-agent" \
      org.opencontainers.image.description="cluster-tunnel agent: dials out to every server replica and dials destinations in its cluster"
COPY --chmod=0755 target/release/tunnel-agent /usr/local/bin/tunnel-agent
ENTRYPOINT ["/usr/local/bin/tunnel-agent"]

FROM runtime AS tunnel-sidecar
LABEL org.opencontainers.image.title="tunnel-sidecar" \
      org.opencontainers.image.description="cluster-tunnel sidecar: per-cluster loopback ports and an HTTP proxy beside a hub application"
COPY --chmod=0755 target/release/tunnel-sidecar /usr/local/bin/tunnel-sidecar
ENTRYPOINT ["/usr/local/bin/tunnel-sidecar"]

FROM runtime AS tunnel-injector
LABEL org.opencontainers.image.title="tunnel-injector" \
      org.opencontainers.image.description="cluster-tunnel injector: the mutating admission webhook that adds the sidecar"
COPY --chmod=0755 target/release/tunnel-injector /usr/local/bin/tunnel-injector
ENTRYPOINT ["/usr/local/bin/tunnel-injector"]

FROM runtime AS tunnel-manager
LABEL org.opencontainers.image.title="tunnel-manager" \
      org.opencontainers.image.description="cluster-tunnel manager: hub controllers, the OCM addon, certificates and the health command"
COPY --chmod=0755 target/release/tunnel-manager /usr/local/bin/tunnel-manager
ENTRYPOINT ["/usr/local/bin/tunnel-manager"]
