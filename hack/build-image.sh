#!/usr/bin/env bash
# Builds the mesh-agent OCI image from Containerfile without pulling anything: the context is a
# rootfs made here (the stripped binary, the shared libraries ldd lists for it, /etc/passwd and
# /etc/group), buildah (Debian package) builds it with vfs storage kept under OUT_DIR, and the result
# is written as an OCI image layout (OUT_DIR/oci, tag = VERSION) and an OCI archive
# (OUT_DIR/mesh-agent-VERSION.oci.tar). Nothing outside OUT_DIR is touched.
#
# Usage: hack/build-image.sh BINARY OUT_DIR VERSION      (root: buildah's vfs storage)
set -euo pipefail

binary=${1:?usage: $0 BINARY OUT_DIR VERSION}
out=${2:?usage: $0 BINARY OUT_DIR VERSION}
version=${3:?usage: $0 BINARY OUT_DIR VERSION}
root="$(cd "$(dirname "$0")/.." && pwd)"
name=localhost/wiremesh/mesh-agent:$version

command -v buildah >/dev/null || { echo "build-image.sh: needs buildah (apt-get install buildah)" >&2; exit 1; }
[ -x "$binary" ] || { echo "build-image.sh: $binary is not an executable" >&2; exit 1; }

mkdir -p "$out"
out="$(cd "$out" && pwd)"
context="$out/context"
rm -rf "$context" "$out/oci" "$out/mesh-agent-$version.oci.tar"
mkdir -p "$context/rootfs/usr/local/bin" "$context/rootfs/etc"
cp "$root/Containerfile" "$context/Containerfile"

# The binary without debug info, and exactly the libraries the dynamic loader resolves for it.
strip -o "$context/rootfs/usr/local/bin/mesh-agent" "$binary"
libs=$(ldd "$binary" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }')
for lib in $libs; do
	mkdir -p "$context/rootfs$(dirname "$lib")"
	cp -L "$lib" "$context/rootfs$lib"
done
printf 'root:x:0:0:root:/:/nonexistent\nnobody:x:65534:65534:nobody:/:/nonexistent\n' >"$context/rootfs/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$context/rootfs/etc/group"
echo "build-image.sh: rootfs: mesh-agent + $(echo "$libs" | wc -w) libraries ($(echo $libs | tr '\n' ' '))"

storage=(--root "$out/storage" --runroot "$out/run" --storage-driver vfs)
revision=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)
created=$(date -u +%Y-%m-%dT%H:%M:%SZ)
buildah "${storage[@]}" build --quiet --format oci --layers=false --pull=never \
	--build-arg VERSION="$version" --build-arg REVISION="$revision" --build-arg CREATED="$created" \
	-f "$context/Containerfile" -t "$name" "$context" >/dev/null
buildah "${storage[@]}" push --quiet "$name" "oci:$out/oci:$version"
buildah "${storage[@]}" push --quiet "$name" "oci-archive:$out/mesh-agent-$version.oci.tar:$version"
buildah "${storage[@]}" rmi --all >/dev/null
rm -rf "$out/storage" "$out/run" "$context"
echo "build-image.sh: $name -> $out/oci (OCI layout) and $out/mesh-agent-$version.oci.tar ($(du -h "$out/mesh-agent-$version.oci.tar" | cut -f1))"
