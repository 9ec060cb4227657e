#!/usr/bin/env bash
# gpu-validate.sh: the whole truth about this crate on your GPU, in one command.
#
# 1. builds every kernel for the local GPU's architecture (nvcc must be findable: see README);
# 2. runs the whole test suite with MOE_REQUIRE_GPU=1, so every GPU test runs rather than skips;
# 3. runs every bench (on a GPU they use realistic shapes: a Mixtral-like and a DeepSeek-like
#    layer at decode and prefill token counts) and collects their records;
# 4. writes BENCHMARKS.md: device, driver, date and, per op and shape, time and fraction of
#    the op's floor.
# Without a GPU it stops before building anything, says why, and changes nothing.
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: scripts/gpu-validate.sh [--out FILE] [--no-tests] [--no-benches] [--dry-run]
  --out FILE    where to write the benchmark page (default: BENCHMARKS.md)
  --no-tests    skip the test suite
  --no-benches  skip the benches (and the page)
  --dry-run     detect the GPU, print the plan, run nothing
environment: NVIDIA_SMI (default nvidia-smi), NVCC / CUDA_HOME as for any build
USAGE
}

out=BENCHMARKS.md
run_tests=1
run_benches=1
dry_run=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out)
      [ $# -ge 2 ] || { echo "gpu-validate: --out needs a file name" >&2; exit 2; }
      out=$2
      shift 2
      ;;
    --no-tests) run_tests=0; shift ;;
    --no-benches) run_benches=0; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "gpu-validate: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
done

smi=${NVIDIA_SMI:-nvidia-smi}
gpu=""
if command -v "$smi" >/dev/null 2>&1; then
  gpu=$("$smi" --query-gpu=name,driver_version,compute_cap --format=csv,noheader 2>/dev/null | head -n 1 || true)
fi
if [ -z "$gpu" ]; then
  echo "gpu-validate: no NVIDIA GPU here ('$smi' is missing or lists no GPU); nothing was built or changed." >&2
  exit 3
fi
IFS=, read -r name driver capability <<<"$gpu"
name=$(echo "$name" | xargs)
driver=$(echo "$driver" | xargs)
arch=$(echo "$capability" | xargs | tr -d .)
case "$arch" in
  '' | *[!0-9]*) echo "gpu-validate: cannot read a compute capability from '$gpu'" >&2; exit 3 ;;
esac

cd "$(dirname "$0")/.."
export MOE_CUDA_ARCHS=$arch MOE_REQUIRE_KERNELS=1 MOE_REQUIRE_GPU=1
echo "gpu-validate: $name, driver $driver, sm_$arch"
echo "plan: tests=$run_tests benches=$run_benches page=$out"
[ "$dry_run" = 0 ] || exit 0

if [ "$run_tests" = 1 ]; then
  cargo test --release
fi
if [ "$run_benches" = 1 ]; then
  log=$(mktemp)
  trap 'rm -f "$log" "$out.partial"' EXIT
  cargo bench 2>&1 | tee "$log"
  cargo run --release --quiet --example benchmarks_md -- \
    --device "$name" --driver "$driver" --date "$(date -u +%Y-%m-%d)" <"$log" >"$out.partial"
  mv "$out.partial" "$out"
  echo "gpu-validate: wrote $out"
fi
