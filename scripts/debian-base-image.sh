#!/usr/bin/env bash
# Builds a local base image for the Dockerfile (Python 3.11 on Debian bookworm, with venv) from Debian's
# packages alone, for machines that reach Debian's archive but no container registry:
#   scripts/debian-base-image.sh [TAG]        # default TAG: localhost/jmap-gateway-base:bookworm
#   podman build --build-arg BASE_IMAGE=localhost/jmap-gateway-base:bookworm -t jmap-push-gateway .
# Needs root, mmdebstrap and podman. An image that already has TAG is kept (FORCE=1 rebuilds it).
# The host's own trust anchors (/usr/local/share/ca-certificates, e.g. the CA of a TLS-inspecting proxy) are
# copied in, and pip is told to use the system store, so that pip inside the build trusts what the host trusts.
set -euo pipefail
tag=${1:-localhost/jmap-gateway-base:bookworm}

if [ "${FORCE:-0}" != 1 ] && podman image exists "$tag"; then
  echo "$tag exists (FORCE=1 rebuilds it)"
  exit 0
fi
for tool in mmdebstrap podman; do
  command -v "$tool" >/dev/null || { echo "$0: $tool is missing (apt-get install $tool)" >&2; exit 1; }
done

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# The rootfs of a minimal Debian with Python: no docs, manuals or translations (as Debian's slim images).
mmdebstrap --variant=minbase --quiet \
  --include=python3,python3-venv,ca-certificates,netbase,tzdata \
  --aptopt='APT::Install-Recommends "false"' \
  --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
  --customize-hook='if ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1; then
      cp /usr/local/share/ca-certificates/*.crt "$1/usr/local/share/ca-certificates/";
      chroot "$1" update-ca-certificates >/dev/null;
      printf "[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n" > "$1/etc/pip.conf"; fi' \
  --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
  bookworm "$tmp/rootfs.tar"
podman import --quiet --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' "$tmp/rootfs.tar" "$tag"
echo "built $tag"
