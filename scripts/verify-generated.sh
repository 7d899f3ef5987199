#!/usr/bin/env bash
# Rebuilds the bpf2go output in a scratch copy of the sources and fails if any committed
# generated file differs from the fresh build.
set -euo pipefail

command -v clang-19 >/dev/null || { echo "clang-19 is missing: run 'make deps' (as root)" >&2; exit 1; }
top=$(git rev-parse --show-toplevel)
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

cp -r "$top/go.mod" "$top/go.sum" "$top/bpf" "$scratch/"
mkdir -p "$scratch/pkg/loader"
cp "$top/pkg/loader/gen.go" "$scratch/pkg/loader/"
(cd "$scratch/pkg/loader" && go generate ./... >/dev/null)

status=0
for f in "$@"; do
	if ! cmp -s "$top/$f" "$scratch/$f"; then
		echo "stale generated file: $f differs from a fresh build; run 'make generate' and commit the result" >&2
		status=1
	fi
done
[ $status = 0 ] && echo "generated BPF objects match a fresh build"
exit $status
