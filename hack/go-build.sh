#!/usr/bin/env bash
# Runs a long `go build`/`go install` with a short header (what, why, roughly how long) and a progress
# line every 15 seconds instead of hundreds of silent `go: downloading` lines.
#
# Usage: hack/go-build.sh WHAT WHY ESTIMATE DIR -- go build|install ARGS...
#   WHAT      what is built, e.g. "kubectl"
#   WHY       one sentence: what it is for
#   ESTIMATE  e.g. "~1 min from Go's cache, ~15 min on a fresh machine"
#   DIR       directory to run go in
# The whole output goes to .cache/logs/go-build-<WHAT>.log; on failure its tail is printed.
set -euo pipefail

if [[ $# -lt 6 || "$5" != "--" ]]; then
	echo "usage: $0 WHAT WHY ESTIMATE DIR -- go build|install ARGS..." >&2
	exit 2
fi
what=$1 why=$2 estimate=$3 dir=$4
shift 5

root="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$root/.cache/logs"
log="$root/.cache/logs/go-build-${what//[^A-Za-z0-9_.-]/_}.log"

echo "==> building $what: $why"
echo "    takes $estimate; progress every 15 s, full output in ${log#"$root"/}"

# -v names every package as it is compiled (cached packages are not named), so the count moves.
cmd=("$1" "$2" -v "${@:3}")
start=$SECONDS
last=$SECONDS
downloads=0
packages=0
current=""
status=0
{
	cd "$dir"
	"${cmd[@]}" 2>&1 || echo "go-build.sh: exit status $?"
} | tee "$log" | {
	while IFS= read -r line; do
		case "$line" in
		"go: downloading "*) downloads=$((downloads + 1)); current="download ${line#go: downloading }" ;;
		"go-build.sh: exit status "*) status=${line##* } ;;
		*/* | [a-z]*) packages=$((packages + 1)); current="compile $line" ;;
		esac
		if ((SECONDS - last >= 15)); then
			last=$SECONDS
			printf '    [%dm%02ds] %d modules downloaded, %d packages compiled; now: %s\n' \
				$(((SECONDS - start) / 60)) $(((SECONDS - start) % 60)) "$downloads" "$packages" "$current"
		fi
	done
	if [[ $status != 0 ]]; then
		echo "==> building $what FAILED (exit $status); last lines of ${log#"$root"/}:" >&2
		tail -n 40 "$log" >&2
		exit 1
	fi
	printf '==> built %s in %dm%02ds (%d modules downloaded, %d packages compiled)\n' \
		"$what" $(((SECONDS - start) / 60)) $(((SECONDS - start) % 60)) "$downloads" "$packages"
}
