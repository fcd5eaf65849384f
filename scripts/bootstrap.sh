#!/usr/bin/env bash
# bootstrap.sh: bring a fresh Debian 12 machine up to build and test threadloom.
#
#   1. apt packages (build tools, hwloc, libnuma, mimalloc, xxhash, SLURM's client, daemons and
#      munge for the local test cluster, CPython's build deps),
#      installed only when one is missing;
#   2. a free-threaded CPython (--disable-gil), built from Debian trixie's python3.13 source
#      package (downloaded and hash-verified by apt through a private sources dir; the
#      system's apt configuration is never edited), cached outside the clone, keyed by version
#      and flavour (PGO + LTO by default);
#   3. the test and benchmark packages from PyPI (pytest, numpy, Pillow, torch, ...; versions
#      from requirements/pins.txt), for the free-threaded interpreter and for the GIL baseline
#      (the system's Python 3.11), each set installed once into the cache (pydeps-<abi>-<key>);
#   4. two venvs of this checkout, build/venv (free-threaded) and build/venv-gil (the
#      baseline), which see their cached set through a .pth file; `make build` installs
#      threadloom into them with pip.
#
# A second run finds everything in the cache and only (re)makes missing venvs (no network, no
# apt). PYTHON=/path/to/python3.14t uses an existing free-threaded interpreter instead of step
# 2; a GIL build is refused. The result is written to build/bootstrap.env for the Makefile.
#
# Environment: THREADLOOM_CACHE (default ~/.cache/threadloom), PYTHON, GIL_PYTHON (default
# /usr/bin/python3), TL_CPYTHON_PGO (default 1: PGO + LTO), TL_CPYTHON_VERSION
# (default 3.13.5), DEBIAN_MIRROR (default http://deb.debian.org/debian), JOBS.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
cache=${THREADLOOM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/threadloom}
pyver=${TL_CPYTHON_VERSION:-3.13.5}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
jobs=${JOBS:-$(nproc)}
# PGO + LTO (--enable-optimizations --with-lto): ~1.3x faster Python code (measured here: a
# per-sample loader transform 66.8 -> 51.5 us, fib(25) 16.5 -> 12.3 ms), for a ~16-minute build
# instead of ~2.5. TL_CPYTHON_PGO=0 builds the quick, slower one (a cache entry of its own).
pgo=${TL_CPYTHON_PGO:-1}
case $pgo in 0) flavour=freethreaded ;; 1) flavour=freethreaded-pgo ;;
  *) printf 'bootstrap: error: TL_CPYTHON_PGO must be 0 or 1, not %s\n' "$pgo" >&2; exit 1 ;; esac
prefix=$cache/cpython-$pyver-$flavour
pins=$here/requirements/pins.txt
envfile=$here/build/bootstrap.env

say() { printf 'bootstrap: %s\n' "$*" >&2; }
die() { printf 'bootstrap: error: %s\n' "$*" >&2; exit 1; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null; then sudo "$@"
  else die "need root to run: $* (install sudo or run as root)"; fi
}

mkdir -p "$cache" "$here/build"
# One bootstrap at a time per cache (make test and make demo may race on a fresh machine).
exec 9>"$cache/.lock"
flock 9

# ---------------------------------------------------------------------------------------------
# 1. apt packages
# ---------------------------------------------------------------------------------------------
apt_pkgs=(
  build-essential cmake pkg-config dpkg-dev ca-certificates xz-utils
  libhwloc-dev hwloc-nox libnuma-dev libmimalloc-dev libxxhash-dev
  # io_uring for O_DIRECT checkpoint writes (optional in CMake: TL_WITH_URING)
  liburing-dev
  # scontrol, to check the host-list parser against SLURM's (tests/python/test_cluster.py);
  # the daemons and ip, for the local cluster of scripts/slurm-cluster.sh (tests/python/test_slurm.py)
  slurm-client slurmd slurmctld munge iproute2
  # the system's Python 3.11, the GIL baseline (its venv build/venv-gil gets torch from PyPI):
  # its headers to build threadloom for it, venv to make the venv
  python3-dev python3-venv
  # CPython's build dependencies (the optional modules the stdlib needs)
  libssl-dev zlib1g-dev libbz2-dev libffi-dev liblzma-dev libsqlite3-dev libreadline-dev
  libncurses-dev uuid-dev libgdbm-dev libgdbm-compat-dev libexpat1-dev
)
missing=()
for p in "${apt_pkgs[@]}"; do
  [ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null)" = installed ] || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing apt packages: ${missing[*]}"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# A private apt configuration for Debian trixie: its own sources list, lists, caches and
# status, so nothing of the system's apt state is read or written.
trixie_apt() {
  local d=$cache/apt-trixie
  if [ ! -f "$d/.updated" ]; then
    mkdir -p "$d/lists/partial" "$d/archives/partial" "$d/cache"
    : > "$d/status"
    cat > "$d/sources.list" <<SRC
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror trixie main
deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror trixie main
SRC
  fi
  local opts=(
    -o "Dir::Etc::SourceList=$d/sources.list" -o "Dir::Etc::SourceParts=$d/none"
    -o "Dir::State::Lists=$d/lists" -o "Dir::State::Status=$d/status"
    -o "Dir::Cache=$d/cache" -o "Dir::Cache::Archives=$d/archives"
    -o "Debug::NoLocking=1" -o "APT::Sandbox::User=root"
  )
  if [ ! -f "$d/.updated" ]; then
    say "fetching Debian trixie indexes from $mirror (private apt dir $d)"
    apt-get "${opts[@]}" update -q >&2 || die "apt-get update for trixie failed (is $mirror reachable?)"
    touch "$d/.updated"
  fi
  apt-get "${opts[@]}" "$@"
}

is_free_threaded() {  # $1: interpreter; true when it is a --disable-gil build
  "$1" -c 'import sys, sysconfig; sys.exit(0 if sysconfig.get_config_var("Py_GIL_DISABLED") else 1)' 2>/dev/null
}

# ---------------------------------------------------------------------------------------------
# 2. the free-threaded interpreter
# ---------------------------------------------------------------------------------------------
if [ -n "${PYTHON:-}" ]; then
  command -v "$PYTHON" >/dev/null || die "PYTHON=$PYTHON: no such interpreter"
  PYTHON=$(command -v "$PYTHON")
  is_free_threaded "$PYTHON" || die "PYTHON=$PYTHON is a GIL build of CPython. threadloom needs a \
free-threaded one (3.13t or newer, configured with --disable-gil). Unset PYTHON to have this \
script build CPython $pyver --disable-gil into $cache, or point PYTHON at e.g. python3.13t."
  python=$PYTHON
elif [ -x "$prefix/bin/python${pyver%.*}t" ]; then
  python=$prefix/bin/python${pyver%.*}t
else
  t0=$(date +%s)
  work=$cache/build-cpython-$pyver-$flavour
  rm -rf "$work"; mkdir -p "$work"
  say "downloading the python3.13 source package from trixie (apt verifies its hashes)"
  (cd "$work" && trixie_apt source --download-only -q python3.13 >&2)
  orig=$(ls "$work"/python3.13_*.orig.tar.xz 2>/dev/null | head -n1)
  [ -n "$orig" ] || die "apt did not download python3.13's orig tarball into $work"
  got=$(basename "$orig" | sed -E 's/^python3\.13_([0-9.]+)\.orig\.tar\.xz$/\1/')
  [ "$got" = "$pyver" ] || die "trixie serves CPython $got, not $pyver. Rerun with TL_CPYTHON_VERSION=$got."
  tar -C "$work" -xJf "$orig"
  src=$(find "$work" -mindepth 1 -maxdepth 1 -type d -name 'Python-*' | head -n1)
  opt=()
  if [ "$pgo" = 1 ]; then
    opt=(--enable-optimizations --with-lto)
    say "building CPython $pyver --disable-gil with PGO + LTO, $jobs jobs (about 16 minutes on 2 cores; TL_CPYTHON_PGO=0: 2.5 minutes, ~1.3x slower Python)"
  else
    say "building CPython $pyver --disable-gil with $jobs jobs (a few minutes)"
  fi
  (
    cd "$src"
    ./configure -q --prefix="$prefix" --disable-gil --enable-shared --without-ensurepip \
      --disable-test-modules "${opt[@]}" LDFLAGS="-Wl,-rpath,$prefix/lib" >"$work/configure.log" 2>&1 \
      || { tail -n 30 "$work/configure.log" >&2; exit 1; }
    # The profile run is CPython's --pgo test subset; a few of its tests fail without the test
    # modules (test_functools, test_ordered_dict, test_struct in 3.13.5): the profile is still
    # good, so their failure must not stop the build.
    make -j"$jobs" PROFILE_TASK='-m test --pgo --timeout=1200 || true' >"$work/make.log" 2>&1 \
      || { tail -n 40 "$work/make.log" >&2; exit 1; }
    # Install into a staging root, then move into place: an interrupted build leaves no
    # half-installed interpreter in the cache.
    make install DESTDIR="$work/stage" >"$work/install.log" 2>&1 || { tail -n 30 "$work/install.log" >&2; exit 1; }
  ) || die "building CPython failed; logs are in $work"
  rm -rf "$prefix"
  mv "$work/stage$prefix" "$prefix"
  rm -rf "$work"
  python=$prefix/bin/python${pyver%.*}t
  say "built $python in $(( $(date +%s) - t0 ))s"
fi
is_free_threaded "$python" || die "$python is not a free-threaded build"
"$python" -c 'import sys; sys.exit(1 if sys._is_gil_enabled() else 0)' \
  || die "$python runs with the GIL enabled (PYTHON_GIL=1 set?); unset PYTHON_GIL"

# ---------------------------------------------------------------------------------------------
# 3. the Python packages, from PyPI, cached per interpreter and pin set
# ---------------------------------------------------------------------------------------------
# Cached outside the clone because torch pulls ~3 GB of nvidia-* wheels (~5 GB installed) per
# interpreter: a fresh clone (CI) reuses them instead of downloading and unpacking them again,
# and the venvs of step 4 stay cheap to make. Written to a temporary directory and renamed, so
# an interrupted install leaves no half set; never changed afterwards.
ft_pkgs=(pytest numpy pillow torch scikit-build-core)
gil_pkgs=(pytest numpy pillow torch safetensors scikit-build-core)
[ -f "$pins" ] || die "$pins is missing"
for p in "${ft_pkgs[@]}" "${gil_pkgs[@]}"; do
  grep -qiE "^$p==[^ ]+" "$pins" || die "$p has no version in requirements/pins.txt: add a line $p==VERSION there"
done

deps_dir() {  # $1: interpreter, $2...: packages. The cache directory of that set.
  local py=$1; shift
  local abi key
  abi=$("$py" -c 'import sys; print("cp%d%d%s" % (sys.version_info[:2] + (getattr(sys, "abiflags", ""),)))')
  key=$({ cat "$pins"; echo "$*"; "$py" -c 'import os, sys; print(sys.version, os.path.realpath(sys._base_executable))'; } \
    | sha256sum | cut -c1-12)
  echo "$cache/pydeps-$abi-$key"
}

install_deps() {  # $1: a venv's python (with pip), $2: the cache directory, $3...: packages
  local vpy=$1 deps=$2; shift 2
  [ -f "$deps/.complete" ] && return 0
  say "installing $* from PyPI into $deps (versions from requirements/pins.txt; once per pin set)"
  rm -rf "$deps.tmp"
  "$vpy" -m pip install --quiet --no-input --disable-pip-version-check --progress-bar off \
    --target "$deps.tmp" -c "$pins" "$@" >&2 \
    || die "pip could not install $* for $vpy (is PyPI reachable? see pip's message above)"
  "$vpy" -m pip freeze --path "$deps.tmp" >"$deps.tmp/FROZEN.txt"
  touch "$deps.tmp/.complete"
  mv "$deps.tmp" "$deps"
}

# ---------------------------------------------------------------------------------------------
# 4. the venvs of this checkout
# ---------------------------------------------------------------------------------------------
# In build/, so each clone installs its own threadloom (`make build`: pip install .) and `make
# clean` removes them; the packages of step 3 come in through a .pth file that adds their cache
# directory to sys.path (after the venv's own site-packages, so the venv's threadloom wins).
make_venv() {  # $1: venv directory, $2: base interpreter
  local venv=$1 py=$2 real
  real=$(readlink -f "$py")
  if [ -x "$venv/bin/python" ] && [ "$(cat "$venv/.threadloom-base" 2>/dev/null)" = "$real" ]; then
    return 0
  fi
  say "making $venv from $py"
  rm -rf "$venv"
  "$py" -m venv "$venv" >&2 || die "$py -m venv $venv failed (Debian: apt install python3-venv)"
  echo "$real" >"$venv/.threadloom-base"
}

link_deps() {  # $1: venv directory, $2: the cache directory of its packages
  local site
  site=$("$1/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
  printf 'import site; site.addsitedir(%s)\n' "'$2'" >"$site/threadloom-pydeps.pth"
}

venv=$here/build/venv
gil_python=${GIL_PYTHON:-/usr/bin/python3}
command -v "$gil_python" >/dev/null || die "GIL_PYTHON=$gil_python: no such interpreter"
is_free_threaded "$gil_python" && die "GIL_PYTHON=$gil_python is free-threaded; the baseline needs a Python with the GIL"
gil_venv=$here/build/venv-gil

make_venv "$venv" "$python"
ft_deps=$(deps_dir "$python" "${ft_pkgs[@]}")
install_deps "$venv/bin/python" "$ft_deps" "${ft_pkgs[@]}"
link_deps "$venv" "$ft_deps"
make_venv "$gil_venv" "$gil_python"
gil_deps=$(deps_dir "$gil_python" "${gil_pkgs[@]}")
install_deps "$gil_venv/bin/python" "$gil_deps" "${gil_pkgs[@]}"
link_deps "$gil_venv" "$gil_deps"

# Cheap checks (find_spec, no import: torch takes seconds to import).
check_pkgs() {  # $1: python, $2...: import names
  local py=$1; shift
  "$py" -c 'import importlib.util as u, sys
missing = [m for m in sys.argv[1:] if u.find_spec(m) is None]
sys.exit("missing: " + " ".join(missing) if missing else 0)' "$@" \
    || die "$py lacks packages of its cached set; remove its pydeps-* directory in $cache and rerun"
}
check_pkgs "$venv/bin/python" pytest numpy PIL torch scikit_build_core
check_pkgs "$gil_venv/bin/python" pytest numpy PIL torch safetensors scikit_build_core

tmp=$envfile.tmp.$$
{
  echo "# written by scripts/bootstrap.sh; do not edit"
  echo "PYTHON := $venv/bin/python"
  echo "BASE_PYTHON := $python"
  echo "GIL_PYTHON := $gil_venv/bin/python"
} >"$tmp"
mv "$tmp" "$envfile"
say "ready: $venv ($("$python" -c 'import sys; print(sys.version.split()[0])') free-threaded) and $gil_venv (the GIL baseline), packages from $cache/pydeps-*"
