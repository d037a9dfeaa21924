# syntax=docker/dockerfile:1
# One image with both binaries: wset-agent (run as root with CAP_SYS_PTRACE
# by the DaemonSet, see deploy/) and wset-controller (non-root).
# Build: docker build -t wset:latest .
# The build stage runs scripts/image-rootfs.sh, which scripts/test.sh also
# runs and checks.

FROM rust:1.95-bookworm AS build
WORKDIR /src
# Dependencies are locked (Cargo.lock, --locked); protox compiles the
# protos, so no protoc is needed.
COPY . .
RUN scripts/image-rootfs.sh /rootfs

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /rootfs/ /
USER 65532:65532
EXPOSE 7070 7071
ENTRYPOINT ["/usr/local/bin/wset-controller"]
