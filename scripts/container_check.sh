#!/usr/bin/env bash
# Builds the Dockerfile with podman on a machine that has no Docker engine and reaches no container registry, runs
# the image, and asks its /health, /ready and /v1/embeddings on loopback (docs/deploy.md, "What was verified").
#
#   sudo scripts/container_check.sh [SERVE_ARG...]    # e.g. --host 0.0.0.0 where PADFREE_HOST is not read yet
#
# What it stands in for, and why:
#  - the base image: python:3.11-slim-bookworm cannot be pulled (no registry), so a Debian 12 root made by
#    debootstrap from Debian's archive, with Debian's python3 3.11, python3-venv and python3-dev (the headers that
#    python:3.11-slim has), is imported as the base and passed through the Dockerfile's BASE argument. Both
#    stages use it, as they use python:3.11-slim-bookworm;
#  - pip's sources: the build's pip gets this machine's pip configuration (its CA bundle, its local wheel directory
#    and indexes, mounted read-only), so TORCH_INDEX_URL is empty: torch is the CPU wheel of /opt/wheels;
#  - podman's runtime: crun refuses this VM's hybrid cgroup v1/v2 layout, and podman's default rlimits exceed
#    this VM's hard limits, so a containers.conf of its own picks runc and lower rlimits.
# Needs root, podman, runc and debootstrap (apt-get install podman runc debootstrap) and Debian's archive.
# It builds what git has committed (git archive HEAD), not the working tree's uncommitted changes.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
work=${CHECK_DIR:-/tmp/padfree-container-check}
base=localhost/debian-python3:bookworm
image=localhost/padfree:check
name=padfree-check
port=${CHECK_PORT:-18080}
mkdir -p "$work"

for tool in podman runc debootstrap curl; do
    command -v "$tool" >/dev/null || { echo "container_check: needs $tool (apt-get install podman runc debootstrap curl)" >&2; exit 2; }
done
cat > "$work/containers.conf" <<'EOF'
[containers]
default_ulimits = ["nofile=4096:4096", "nproc=4096:4096"]
[engine]
runtime = "runc"
EOF
export CONTAINERS_CONF=$work/containers.conf

step() { printf '\n== %s\n' "$*"; }
# the Debian archive this machine's apt uses (DEBIAN_MIRROR overrides): the first URI of its sources
debian_mirror() {
    [ -n "${DEBIAN_MIRROR:-}" ] && { echo "$DEBIAN_MIRROR"; return; }
    { grep -h '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}'
      grep -h '^deb ' /etc/apt/sources.list 2>/dev/null | awk '{print $2}'; } | head -n 1
}

# 1. the base: Debian 12 from Debian's archive, with this machine's CA bundle (TLS to PyPI goes through its proxy)
#    and Python's headers (python:3.11-slim has them; torch's extension builder includes Python.h)
if ! podman image exists "$base"; then
    if ! podman image exists "$base-root"; then
        step "debootstrap bookworm -> $base-root"
        [ -x "$work/rootfs/usr/bin/python3" ] || debootstrap --variant=minbase \
            --include=python3,python3-venv,ca-certificates bookworm "$work/rootfs" "$(debian_mirror)" \
            > "$work/debootstrap.log"
        cp /etc/ssl/certs/ca-certificates.crt "$work/rootfs/etc/ssl/certs/ca-certificates.crt"
        tar -C "$work/rootfs" -c . | podman import \
            --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
            --change 'ENV PIP_FIND_LINKS=/opt/wheels' \
            --change 'ENV PIP_EXTRA_INDEX_URL="file:///opt/pypi/simple file:///opt/pypi-more/simple"' \
            --change 'CMD ["/bin/bash"]' - "$base-root"
    fi
    step "$base: $base-root with python3-dev"
    printf 'FROM %s\nRUN apt-get update && apt-get install -y --no-install-recommends python3-dev && rm -rf /var/lib/apt/lists/*\n' \
        "$base-root" | podman build --format docker -t "$base" -f - "$work"
fi

# 2. the build context: the committed tree
step "build context: git archive HEAD ($(git -C "$repo" rev-parse --short HEAD))"
rm -rf "$work/src" && mkdir -p "$work/src"
git -C "$repo" archive HEAD | tar -x -C "$work/src"

# 3. the image (docker format: the OCI format has no HEALTHCHECK)
step "podman build -> $image"
mounts=()
for d in /opt/wheels /opt/pypi /opt/pypi-more; do [ -d "$d" ] && mounts+=(-v "$d:$d:ro"); done
start=$(date +%s)
podman build --format docker --layers -t "$image" --build-arg BASE="$base" --build-arg TORCH_INDEX_URL= "${mounts[@]}" "$work/src"
echo "built in $(( $(date +%s) - start )) s"
podman image ls "$image"

# 4. the runtime image as such: user, no compiler, the module's libraries, the built module's place
step "runtime image: user, compiler, libgomp, the prebuilt module"
podman run --rm --entrypoint bash "$image" -c '
    id
    if command -v g++ c++ cc >/dev/null; then echo "a compiler is in the runtime image"; exit 1; fi
    echo "no compiler (g++, c++, cc) in the runtime image"
    so=$(ls "$PADFREE_CACHE"/native/*/*.so); ls -l "$so"
    # the torch libraries are found through the torch already loaded in the process; ldd needs their directory
    export LD_LIBRARY_PATH=$(python -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), \"lib\"))")
    ldd "$so" | grep -E "gomp|not found" || true
    ! ldd "$so" | grep -q "not found"'

# 5. the server: read-only root file system (a rebuild of the native module would have to write), /data a volume
step "podman run (read-only root) and the routes on 127.0.0.1:$port"
podman rm -f "$name" >/dev/null 2>&1 || true
podman volume rm -f padfree-check-data >/dev/null 2>&1 || true
trap 'podman rm -f "$name" >/dev/null 2>&1 || true' EXIT
podman run -d --name "$name" --read-only --tmpfs /tmp -v padfree-check-data:/data \
    -p "127.0.0.1:$port:8080" -e PADFREE_THREADS=2 "$image" "$@"
for _ in $(seq 1 120); do
    curl -fsS -o /dev/null "http://127.0.0.1:$port/health" 2>/dev/null && break
    [ "$(podman inspect -f '{{.State.Running}}' "$name")" = true ] || break
    sleep 1
done
podman logs "$name" 2>&1 | tail -20
url=http://127.0.0.1:$port
echo "GET /health: $(curl -s -o /dev/null -w '%{http_code}' "$url/health")"
echo "GET /ready: $(curl -s -o /dev/null -w '%{http_code}' "$url/ready")"
curl -fsS "$url/v1/embeddings" -H 'Content-Type: application/json' \
    -d '{"input": ["What is padfree?", "A server"], "model": "all-MiniLM-L6-v2"}' \
    | python3 -c 'import json, sys; r = json.load(sys.stdin); print("POST /v1/embeddings:", len(r["data"]), "embeddings of", len(r["data"][0]["embedding"]), "floats,", r["usage"])'
echo "GET /info native module: $(curl -fsS "$url/info" | python3 -c 'import json, sys; r = json.load(sys.stdin); print(json.dumps(r).split("native_module")[1][:200] if "native_module" in json.dumps(r) else "(not in /info)")')"
if podman logs "$name" 2>&1 | grep -q "building the native"; then
    echo "the server rebuilt the native module at run time"; exit 1
fi
echo "the server did not build the native module (no 'building the native' log line; read-only root)"
podman exec "$name" padfree info | grep -i -E "native|features|CPU:"
echo "memory after the requests: $(podman stats --no-stream --format '{{.MemUsage}}' "$name" 2>&1 | tail -1)"
echo "HEALTHCHECK: $(podman healthcheck run "$name" >/dev/null 2>&1 && echo healthy || echo unhealthy)"

# 6. SIGTERM drains and exits 0
step "podman stop (SIGTERM)"
podman stop -t 30 "$name" >/dev/null
echo "exit code after SIGTERM: $(podman inspect -f '{{.State.ExitCode}}' "$name")"
