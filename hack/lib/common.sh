# Shared settings for the hack/ scripts. Sourced, never run.
# The cache lives outside the work tree so that a fresh clone on the same machine reuses builds.
CHECKPOINTER_CACHE=${CHECKPOINTER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/checkpointer}
CHECKPOINTER_BIN=$CHECKPOINTER_CACHE/bin
KUBERNETES_VERSION=v1.34.4
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
export CHECKPOINTER_CACHE CHECKPOINTER_BIN KUBERNETES_VERSION REPO_ROOT

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# A stamp file named after the hash of the inputs marks a finished build of exactly those inputs.
inputs_hash() { cat "$@" | sha256sum | cut -c1-16; }

# The Debian mirror this machine's apt sources name (hack/localenv/apt_mirror.py, which the Python
# code uses too); fails, saying where it looked, when they name none.
debian_mirror() { PYTHONPATH=$REPO_ROOT/hack python3 -m localenv.apt_mirror; }
