# syntax=docker/dockerfile:1
# The keyway gateway image: `keyway` on a small non-root runtime (distroless cc: glibc and
# libgcc, no shell). Build from the repository root:
#   docker build -f istio/gateway.Dockerfile -t registry.example.invalid/keyway/gateway:0.1.0 .
# (BuildKit reads istio/gateway.Dockerfile.dockerignore beside it.) Not built on the project's
# machines: they have no Docker engine.
FROM docker.io/library/rust:1.95.0-slim-bookworm AS build
WORKDIR /src
# rust-toolchain.toml pins 1.95.0; the wasm target it lists is not needed for the gateway.
ENV RUSTUP_TOOLCHAIN=1.95.0 CARGO_TERM_COLOR=never
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p keyway-gateway --bin keyway \
    && install -D -m 0755 target/release/keyway /out/keyway

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/keyway /usr/local/bin/keyway
USER 65532:65532
EXPOSE 15180/tcp 15443/udp 15190/tcp
ENTRYPOINT ["/usr/local/bin/keyway"]
CMD ["gateway", "--config", "/etc/keyway/gateway.yaml"]
