#!/usr/bin/env bash
# Smoke build of the CPU image where no container can run: build docker/Dockerfile with podman (or buildah) in
# chroot isolation against a local stand-in base image, and prove the image works *inside the build* (the 'smoke'
# stage runs `medwsol --version`, `medwsol validate pipelines/demo.yaml`, imports torch and OpenSlide, and checks
# the entrypoint's error messages). Not part of `make test`.
#
#   docker/smoke.sh            # from anywhere; needs root (or rootless podman), podman or buildah, mmdebstrap
#
# The stand-in base is a Debian bookworm rootfs (python3 3.11, python3-venv, ca-certificates, passwd) made with
# mmdebstrap and `podman import`ed as localhost/medwsol-base:bookworm, the same Debian and Python as the default
# base python:3.11-slim-bookworm. The host's extra CA certificates (/usr/local/share/ca-certificates, e.g. of a
# TLS-inspecting proxy) go into it, so pip inside the build trusts what pip on the host trusts.
#
# torch: a real build takes it from https://download.pytorch.org/whl/cpu. Where that index is out of reach, set
# TORCH_WHEEL=/path/to/torch-<version>+cpu-cp311-...whl (or have one in pip's find-links, PIP_FIND_LINKS): it is
# copied into docker/wheels/ for this build only, and TORCH_INDEX_URL then defaults to PyPI for torch's own
# dependencies. The Dockerfile refuses a CUDA torch either way.
#
# It leaves the images medwsol:cpu-smoke (the runtime) and medwsol:cpu-smoke-checked (the smoke stage) and the base
# behind for inspection: `podman rmi medwsol:cpu-smoke-checked medwsol:cpu-smoke` removes them.
#
# Environment: SMOKE_DIR (cache of the base rootfs, /var/tmp/medwsol-smoke), SMOKE_REBUILD_BASE=1, DEBIAN_MIRROR,
# TORCH_VERSION (2.13.0), TORCH_WHEEL, TORCH_INDEX_URL, PIP_INDEX_URL (https://pypi.org/simple), IMAGE (medwsol:cpu-smoke).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
smoke_dir=${SMOKE_DIR:-/var/tmp/medwsol-smoke}
base_image=localhost/medwsol-base:bookworm
image=${IMAGE:-medwsol:cpu-smoke}
torch_version=${TORCH_VERSION:-2.13.0}
pip_index=${PIP_INDEX_URL:-https://pypi.org/simple}
start=$(date +%s)

say() { printf '\n== %s (%ss)\n' "$*" "$(($(date +%s) - start))"; }
die() { printf 'smoke: error: %s\n' "$*" >&2; exit 2; }

if command -v podman >/dev/null; then
    build=(podman build --isolation chroot)
    engine=podman
elif command -v buildah >/dev/null; then
    build=(buildah bud --isolation chroot)
    engine=buildah
else
    die "neither podman nor buildah is installed; fix: apt-get install podman mmdebstrap (or buildah)"
fi
command -v mmdebstrap >/dev/null || die "mmdebstrap is not installed; fix: apt-get install mmdebstrap"
mkdir -p "$smoke_dir"

# ---- 1. the stand-in base image
have_image() { "$engine" inspect --type image "$1" >/dev/null 2>&1; }
image_size() {  # bytes with podman; buildah prints its own rounded figure
    if [ "$engine" = podman ]; then podman image inspect --format '{{.Size}}' "$1"
    else buildah images --noheading --format '{{.Size}}' "$1" | head -n 1; fi
}
if [ "${SMOKE_REBUILD_BASE:-0}" = 1 ] || ! have_image "$base_image"; then
    say "stand-in base: mmdebstrap bookworm -> $base_image"
    hooks=()
    for crt in /usr/local/share/ca-certificates/*.crt; do
        [ -e "$crt" ] || continue
        hooks+=(--customize-hook="copy-in $crt /usr/local/share/ca-certificates/")
    done
    # shellcheck disable=SC2016  # "$1" is the rootfs, expanded by mmdebstrap
    [ "${#hooks[@]}" -eq 0 ] || hooks+=(--customize-hook='chroot "$1" update-ca-certificates')
    mmdebstrap --variant=minbase --include=python3,python3-venv,ca-certificates,passwd "${hooks[@]}" \
        bookworm "$smoke_dir/base.tar" ${DEBIAN_MIRROR:+"$DEBIAN_MIRROR"}
    env_cert=/etc/ssl/certs/ca-certificates.crt
    if [ "$engine" = podman ]; then
        podman import --change "ENV PIP_CERT=$env_cert" --change "ENV SSL_CERT_FILE=$env_cert" \
            --change 'CMD ["/bin/sh"]' "$smoke_dir/base.tar" "$base_image" >/dev/null
    else
        c=$(buildah from scratch)
        buildah add "$c" "$smoke_dir/base.tar" / >/dev/null
        buildah config --env "PIP_CERT=$env_cert" --env "SSL_CERT_FILE=$env_cert" --cmd /bin/sh "$c"
        buildah commit --rm "$c" "$base_image" >/dev/null
    fi
fi
base_size=$(image_size "$base_image")

# ---- 2. torch: a local CPU wheel if there is one, else the CPU index
torch_args=()
copied=""
wheel=${TORCH_WHEEL:-}
if [ -z "$wheel" ]; then
    for dir in ${PIP_FIND_LINKS:-} /opt/wheels; do
        for w in "$dir"/torch-"$torch_version"+cpu-cp311-cp311-*.whl; do
            [ -e "$w" ] && wheel=$w && break 2
        done
    done
fi
if [ -n "$wheel" ]; then
    [ -f "$wheel" ] || die "TORCH_WHEEL=$wheel does not exist; fix: point it at a torch-$torch_version+cpu cp311 wheel"
    case $(basename "$wheel") in
        torch-"$torch_version"+cpu-cp311-*) ;;
        *) die "TORCH_WHEEL=$wheel is not a torch $torch_version CPU wheel for Python 3.11; fix: use torch-$torch_version+cpu-cp311-...whl" ;;
    esac
    if [ ! -e "docker/wheels/$(basename "$wheel")" ]; then
        cp "$wheel" docker/wheels/
        copied="docker/wheels/$(basename "$wheel")"
        trap 'rm -f "$copied"' EXIT
    fi
    torch_args+=(--build-arg "TORCH_INDEX_URL=${TORCH_INDEX_URL:-$pip_index}")
    say "torch: local wheel $(basename "$wheel") (its dependencies from ${TORCH_INDEX_URL:-$pip_index})"
else
    torch_args+=(--build-arg "TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}")
    say "torch: $torch_version from ${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
fi

# ---- 3. what the builder sees: the context after .dockerignore
say "build context after .dockerignore"
ctx=$(mktemp -d)
printf 'FROM %s\nCOPY . /ctx\nRUN cd /ctx && find . -maxdepth 2 -not -name "*.py" | sort && du -sh .\n' "$base_image" \
    >"$ctx/Containerfile"
"${build[@]}" -f "$ctx/Containerfile" -t localhost/medwsol-context-check . | tee "$ctx/out" | sed -n '/^\.$/,/^COMMIT/p'
"$engine" rmi localhost/medwsol-context-check >/dev/null 2>&1 || true
for bad in ./.venv ./runs ./data ./cache ./mlflow.db ./mlruns ./mlartifacts ./.git ./docker/.env ./tests; do
    if grep -qx "$bad" "$ctx/out"; then die "$bad is in the build context; fix: .dockerignore"; fi
done
rm -rf "$ctx"

# ---- 4. the image, then the smoke stage on top of it
common=(-f docker/Dockerfile --build-arg "BASE=$base_image" --build-arg "PIP_INDEX_URL=$pip_index"
        --build-arg "TORCH_VERSION=$torch_version" "${torch_args[@]}"
        --build-arg "VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)"
        --build-arg "VCS_REF=$(git rev-parse HEAD 2>/dev/null || echo unknown)"
        --build-arg "BUILD_DATE=$(date -u +%Y-%m-%dT%H:%M:%SZ)")
say "build --target runtime -> $image"
"${build[@]}" "${common[@]}" --target runtime -t "$image" .
say "build --target smoke (runs medwsol inside the build)"
"${build[@]}" "${common[@]}" --target smoke -t "$image-checked" .

# ---- 5. report
size=$(image_size "$image")
mb() { case $1 in *[!0-9]*) echo "$1" ;; *) awk -v b="$1" 'BEGIN { printf "%.0f MB", b / 1e6 }' ;; esac; }
say "done"
echo "engine:           $("$engine" --version)"
echo "stand-in base:    $base_image, $(mb "$base_size")"
echo "image:            $image, $(mb "$size")"
case $size$base_size in *[!0-9]*) ;; *) echo "on top of base:   $(mb $((size - base_size)))" ;; esac
echo "labels:           $("$engine" inspect --type image --format '{{index .Labels "org.opencontainers.image.version"}} {{index .Labels "org.opencontainers.image.revision"}}' "$image" 2>/dev/null || echo '?')"
if [ "$engine" = podman ]; then
    echo "user/entrypoint:  $(podman image inspect --format 'user={{.Config.User}} entrypoint={{.Config.Entrypoint}} workdir={{.Config.WorkingDir}} volumes={{.Config.Volumes}}' "$image")"
fi
echo "total time:       $(($(date +%s) - start)) s"
