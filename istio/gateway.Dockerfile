# syntax=docker/dockerfile:1
# The keyway gateway image: `keyway` on a small non-root runtime (distroless cc: glibc and
# libgcc, no shell). Build from the repository root:
#   docker build -f istio/gateway.Dockerfile -t registry.example.invalid/keyway/gateway:0.1.0 .
# (BuildKit reads istio/gateway.Dockerfile.dockerignore beside it.) Not built on the project's
# machines: they have no Docker engine.
# The same binary as `keyway agent` in enforced pods (samples/shop/workloads.yaml, container
# keyway-agent): the agent configures its capture with `ip`, which distroless has not, so it gets
# a stage of its own with iproute2:
#   docker build -f istio/gateway.Dockerfile --target agent -t registry.example.invalid/keyway/agent:0.1.0 .
FROM docker.io/library/rust:1.95.0-slim-bookworm AS build
WORKDIR /src
# rust-toolchain.toml pins 1.95.0; the wasm target it lists is not needed for the gateway.
ENV RUSTUP_TOOLCHAIN=1.95.0 CARGO_TERM_COLOR=never
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p keyway-gateway --bin keyway \
    && install -D -m 0755 target/release/keyway /out/keyway

# `keyway agent` (pod mode) for enforced pods: runs as root with NET_ADMIN (TUN device, ip rule and
# route); iproute2 is all it runs.
FROM docker.io/library/debian:bookworm-slim AS agent
RUN apt-get update && apt-get install -y --no-install-recommends iproute2 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/keyway /usr/local/bin/keyway
ENTRYPOINT ["/usr/local/bin/keyway"]
CMD ["agent", "--config", "/etc/keyway-agent/agent.yaml"]

# The gateway (the default, last stage).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/keyway /usr/local/bin/keyway
USER 65532:65532
EXPOSE 15180/tcp 15443/udp 15444/udp 15190/tcp
ENTRYPOINT ["/usr/local/bin/keyway"]
CMD ["gateway", "--config", "/etc/keyway/gateway.yaml"]
