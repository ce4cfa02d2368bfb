#!/usr/bin/env bash
# Pins testenv's go.mod to one k8s.io/kubernetes release.
#
# k8s.io/kubernetes is not meant to be a library: its go.mod requires every staging module
# (k8s.io/api, k8s.io/apiserver, ...) at v0.0.0 and replaces them with ./staging/src paths that only
# exist inside the kubernetes repository. A module that imports it must replace each staging module with
# the published v0.<minor>.<patch> tag of the same release. This script reads that list from the
# kubernetes module's own go.mod (so a release that adds a staging module is picked up) and rewrites
# our go.mod: require k8s.io/kubernetes at the release, one replace per staging module, then go mod tidy.
#
# Usage: ./gen-replaces.sh [v1.37.2]      (needs go and jq; run from anywhere)
set -euo pipefail

KUBE_VERSION="${1:-v1.37.2}"
cd "$(dirname "$0")"
GO="${GO:-go}"
command -v jq >/dev/null || { echo "gen-replaces.sh: needs jq (apt-get install jq)" >&2; exit 1; }

# v1.37.2 -> v0.37.2: staging modules are tagged with the kubernetes minor/patch under major 0.
if [[ ! "$KUBE_VERSION" =~ ^v1\.([0-9]+)\.([0-9]+)$ ]]; then
	echo "gen-replaces.sh: expected a release like v1.37.2, got $KUBE_VERSION" >&2
	exit 1
fi
STAGING_VERSION="v0.${BASH_REMATCH[1]}.${BASH_REMATCH[2]}"

gomod="$("$GO" mod download -json "k8s.io/kubernetes@${KUBE_VERSION}" | jq -r '.GoMod')"
if [[ -z "$gomod" || ! -f "$gomod" ]]; then
	echo "gen-replaces.sh: go mod download did not give a go.mod for k8s.io/kubernetes@${KUBE_VERSION}" >&2
	exit 1
fi

# Every replace in kubernetes' go.mod that points into ./staging/ names one staging module.
mapfile -t staging < <("$GO" mod edit -json "$gomod" |
	jq -r '.Replace[] | select(.New.Path | startswith("./staging/")) | .Old.Path' | sort)
if [[ ${#staging[@]} -eq 0 ]]; then
	echo "gen-replaces.sh: no ./staging replaces found in $gomod" >&2
	exit 1
fi

# -replace updates an existing entry in place, so a re-run for the same release leaves go.mod as it is;
# replaces of modules that are no longer staging modules are dropped.
mapfile -t old < <("$GO" mod edit -json | jq -r '(.Replace // [])[] | .Old.Path')
args=()
for m in "${old[@]}"; do
	if ! printf '%s\n' "${staging[@]}" | grep -qxF "$m"; then args+=("-dropreplace=$m"); fi
done
for m in "${staging[@]}"; do args+=("-replace=${m}=${m}@${STAGING_VERSION}"); done
args+=("-require=k8s.io/kubernetes@${KUBE_VERSION}")
"$GO" mod edit "${args[@]}"

echo "gen-replaces.sh: k8s.io/kubernetes ${KUBE_VERSION}, ${#staging[@]} staging modules at ${STAGING_VERSION}" >&2
"$GO" mod tidy
