#!/usr/bin/env bash
# gpu-validate.sh: the crate's correctness and speed on a GPU, sized for a short lease.
#
# Two halves, on two machines:
#   --build   here, on the development machine (no GPU needed): builds the test and bench
#             executables and the page generator in release for the target arch, strips them,
#             copies them into the bundle folder (default .gpu-bundle) and packs that into
#             .gpu-bundle.tar.xz (both git-ignored): the archive is what is carried to the GPU
#             machine, where a run unpacks it. Nothing is built there: building spends the lease.
#   (run)     on the GPU machine: runs one part of the plan from the bundle. The plan is, in
#             order: short correctness tests with MOE_REQUIRE_GPU=1, the ceilings (copy bandwidth,
#             bf16 GEMM 8192^3), every bench for the Mixtral-like and then the DeepSeek-like
#             shapes at T = 1, 16, 64, 4096, 16384, and the PyTorch peers
#             (scripts/torch_peers.py). Items are packed into parts of at most --budget
#             seconds by their estimates; each part measures the ceilings again, after its
#             tests. Every part writes under --out: run.log (every part's output appended:
#             every record), done (finished items: a rerun with the same folder skips them),
#             plan.txt, and BENCHMARKS.md, benchmarks.json and benchmarks.png rebuilt from
#             run.log: six files, no subfolder (a device tool brings back 8 files).
# Without a GPU the run says so and changes nothing; --dry-run prints the plan anywhere.
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: scripts/gpu-validate.sh --build [--bundle DIR] [--arch N]
       scripts/gpu-validate.sh [--budget SECONDS] [--part N] [--out DIR] [--bundle DIR] [--no-tests] [--dry-run]
  --build         build the executables here into the bundle and DIR.tar.xz (no GPU needed)
  --arch N        with --build: the GPU architecture to compile for (default 90: H100, H200)
  --bundle DIR    the executables (default .gpu-bundle; a run unpacks DIR.tar.xz if DIR is missing)
  --out DIR       where a run writes its results (default gpu-results)
  --budget S      seconds one part may take (default 540: a remote command may run 10 minutes)
  --part N        the part of the plan to run (default 1)
  --no-tests      leave the correctness tests out of the plan
  --dry-run       print the plan with estimated seconds; run nothing
environment: NVIDIA_SMI (default nvidia-smi); for --build, NVCC as for any build
USAGE
}

die() { echo "gpu-validate: $*" >&2; exit 2; }

root=$(cd "$(dirname "$0")/.." && pwd)
build=0
arch=90
bundle=.gpu-bundle
out="gpu-results"
budget=540
part=1
tests=1
dry_run=0
while [ $# -gt 0 ]; do
  case "$1" in
    --build) build=1; shift ;;
    --arch | --bundle | --out | --budget | --part)
      [ $# -ge 2 ] || die "$1 needs a value"
      case "$1" in
        --arch) arch=$2 ;;
        --bundle) bundle=$2 ;;
        --out) out=$2 ;;
        --budget) budget=$2 ;;
        --part) part=$2 ;;
      esac
      shift 2
      ;;
    --no-tests) tests=0; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "gpu-validate: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
done
# Folders given relative to where the script was started.
case "$bundle" in /*) ;; *) bundle=$PWD/$bundle ;; esac
case "$out" in /*) ;; *) out=$PWD/$out ;; esac
for number in "$arch" "$budget" "$part"; do
  case "$number" in '' | *[!0-9]*) die "'$number' is not a whole number" ;; esac
done

# The short correctness suites run first (they cover every kernel the benches time).
test_suites=(devices gemm dispatch router layers)
benches=(router gate dispatch gemm codebook esft mix layers)
models=(mixtral deepseek)
token_counts=1,16,64,4096,16384

# Estimated seconds of each item on an H200, process start and input setup included. Tests:
# their time here (release build, emulator only, 2 cores: devices 0, gemm 5, dispatch 37,
# router 5, layers 6) shared over 16 cores, plus their GPU half. Benches: their per-op times
# (the 2026-11-23 H100 run, rounded up) times their samples (10 to 50, 0.25 s per op at most,
# plus 4 warm-up calls), and the host's share (random inputs, the DeepSeek-like layer's 11 G
# weights). The page's last table has each item's real seconds: correct this one from it.
estimate() {
  case "$1" in
    test:devices) echo 5 ;;
    test:dispatch) echo 25 ;;
    test:*) echo 15 ;;
    ceilings) echo 6 ;;
    bench:router:*) echo 10 ;;
    bench:gate:*) echo 20 ;;
    bench:dispatch:*) echo 8 ;;
    bench:gemm:mixtral) echo 40 ;;
    bench:gemm:deepseek) echo 50 ;;
    bench:codebook:*) echo 8 ;;
    bench:esft:*) echo 5 ;;
    bench:mix:*) echo 6 ;;
    bench:layers:mixtral) echo 35 ;;
    bench:layers:deepseek) echo 70 ;;
    torch:mixtral) echo 40 ;;
    torch:deepseek) echo 50 ;;
    page) echo 3 ;;
    *) echo 10 ;;
  esac
}

# ---- build (here) ----
if [ "$build" = 1 ]; then
  cd "$root"
  export MOE_CUDA_ARCHS=$arch MOE_REQUIRE_KERNELS=1
  mkdir -p "$bundle/tests" "$bundle/benches"
  rm -f "$bundle"/tests/* "$bundle"/benches/* "$bundle/benchmarks_md"
  # Each executable of a target of KIND, by target name, into DEST: cargo prints its path
  # in the compiler-artifact message (wherever CARGO_TARGET_DIR puts it).
  copy_executables() {
    local dest=$1 kind=$2 line name exe
    while IFS= read -r line; do
      exe=$(printf '%s\n' "$line" | grep -o '"executable":"[^"]*"' | cut -d'"' -f4 || true)
      [ -n "$exe" ] || continue
      # Not the library's own test harness: only targets of the kind asked for.
      printf '%s\n' "$line" | grep -q "\"kind\":\[\"$kind\"\]" || continue
      name=$(printf '%s\n' "$line" | grep -o '"target":{[^}]*"name":"[^"]*"' | grep -o '"name":"[^"]*"' | cut -d'"' -f4)
      cp "$exe" "$dest/$name"
      strip "$dest/$name" 2>/dev/null || true
    done
  }
  test_args=()
  for suite in "${test_suites[@]}"; do test_args+=(--test "$suite"); done
  cargo test --release --no-run --message-format=json "${test_args[@]}" | copy_executables "$bundle/tests" test
  cargo bench --no-run --message-format=json | copy_executables "$bundle/benches" bench
  cargo build --release --message-format=json --example benchmarks_md | copy_executables "$bundle" example
  echo "$arch" >"$bundle/ARCH"
  git rev-parse HEAD >"$bundle/COMMIT" 2>/dev/null || echo unknown >"$bundle/COMMIT"
  # The executables share their embedded kernels: one solid xz archive with a 64 MiB window
  # keeps one copy (about 200 MiB of executables become about 7 MiB).
  tar -C "$(dirname "$bundle")" -cf - "$(basename "$bundle")" | xz -9 -T0 >"$bundle.tar.xz"
  echo "gpu-validate: $bundle.tar.xz for sm_$arch: $(du -m "$bundle.tar.xz" | cut -f1) MiB," \
    "$(find "$bundle/tests" -type f | wc -l) test and $(find "$bundle/benches" -type f | wc -l) bench executables"
  exit 0
fi

# ---- the plan ----
items=()
[ "$tests" = 0 ] || for suite in "${test_suites[@]}"; do items+=("test:$suite"); done
for model in "${models[@]}"; do
  for bench in "${benches[@]}"; do items+=("bench:$bench:$model"); done
  items+=("torch:$model")
done
# Pack the items into parts: each part starts with the ceilings and ends with the page.
plan_parts=()   # "part seconds item"
n=1
used=$(($(estimate ceilings) + $(estimate page)))
for item in "${items[@]}"; do
  cost=$(estimate "$item")
  if [ $((used + cost)) -gt "$budget" ] && [ "$used" -gt $(($(estimate ceilings) + $(estimate page))) ]; then
    n=$((n + 1))
    used=$(($(estimate ceilings) + $(estimate page)))
  fi
  used=$((used + cost))
  plan_parts+=("$n $cost $item")
done
parts=$n

print_plan() {
  local p total line item cost
  for p in $(seq 1 "$parts"); do
    total=$(($(estimate ceilings) + $(estimate page)))
    echo "part $p of $parts:"
    ceilings_due=1
    for line in "${plan_parts[@]}"; do
      read -r q cost item <<<"$line"
      [ "$q" = "$p" ] || continue
      if [ "$ceilings_due" = 1 ] && [ "${item%%:*}" != test ]; then
        printf '  %-24s %4ss\n' ceilings "$(estimate ceilings)"
        ceilings_due=0
      fi
      case "$item" in
        test:*) printf '  %-24s %4ss\n' "$item" "$cost" ;;
        *) printf '  %-24s %4ss  T=%s\n' "$item" "$cost" "$token_counts" ;;
      esac
      total=$((total + cost))
    done
    printf '  %-24s %4ss\n' page "$(estimate page)"
    echo "  estimated total: ${total}s of a ${budget}s budget"
  done
}

# ---- the GPU ----
smi=${NVIDIA_SMI:-nvidia-smi}
gpu=""
if command -v "$smi" >/dev/null 2>&1; then
  gpu=$("$smi" --query-gpu=name,driver_version,compute_cap --format=csv,noheader 2>/dev/null | head -n 1 || true)
fi
if [ -z "$gpu" ]; then
  if [ "$dry_run" = 1 ]; then
    echo "gpu-validate: no NVIDIA GPU here; the plan, for a GPU machine:"
    print_plan
    exit 0
  fi
  echo "gpu-validate: no NVIDIA GPU here ('$smi' is missing or lists no GPU); nothing was run or changed." >&2
  exit 3
fi
IFS=, read -r name driver capability <<<"$gpu"
name=$(echo "$name" | xargs)
driver=$(echo "$driver" | xargs)
gpu_arch=$(echo "$capability" | xargs | tr -d .)
case "$gpu_arch" in
  '' | *[!0-9]*) echo "gpu-validate: cannot read a compute capability from '$gpu'" >&2; exit 3 ;;
esac
echo "gpu-validate: $name, driver $driver, sm_$gpu_arch"
if [ "$dry_run" = 1 ]; then
  print_plan
  exit 0
fi
if [ "$part" -lt 1 ] || [ "$part" -gt "$parts" ]; then
  die "--part $part: the plan has parts 1 to $parts"
fi

cd "$root"
if [ ! -x "$bundle/benchmarks_md" ] && [ -f "$bundle.tar.xz" ]; then
  echo "gpu-validate: unpacking $bundle.tar.xz"
  if command -v xz >/dev/null; then
    xz -dc "$bundle.tar.xz" | tar -C "$(dirname "$bundle")" -xf -
  else
    python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' "$bundle.tar.xz" "$(dirname "$bundle")"
  fi
fi
[ -x "$bundle/benchmarks_md" ] || die "no bundle in $bundle: run scripts/gpu-validate.sh --build on the development machine and carry $bundle"
bundle_arch=$(cat "$bundle/ARCH")
[ "$bundle_arch" = "$gpu_arch" ] || echo "gpu-validate: warning: the bundle is built for sm_$bundle_arch, this GPU is sm_$gpu_arch" >&2

# cuBLAS: the loader's path, else the CUDA toolkit's or PyTorch's copy.
if ! ldconfig -p 2>/dev/null | grep -q 'libcublas\.so'; then
  for dir in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
    $(python3 -c 'import nvidia, os; [print(os.path.join(p, d, "lib")) for p in nvidia.__path__ for d in os.listdir(p)]' 2>/dev/null); do
    if ls "$dir"/libcublas.so* >/dev/null 2>&1; then
      export LD_LIBRARY_PATH="$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    fi
  done
fi

mkdir -p "$out"
log="$out/run.log"
done_file="$out/done"
touch "$done_file"
print_plan >"$out/plan.txt"
export MOE_REQUIRE_GPU=1 MOE_BENCH_GPU_ONLY=1
start=$SECONDS

# Runs one item with what is left of the budget (less the page's share), logging its output
# and its seconds; a finished item goes into the done file.
run_item() {
  local item=$1 kind model bench left began status
  left=$((budget - (SECONDS - start) - $(estimate page)))
  if [ "$left" -le 0 ]; then
    echo "gpu-validate: $item: no time left in this part" | tee -a "$log"
    return 0
  fi
  began=$SECONDS
  echo "== $item (at ${SECONDS}s, ${left}s left, estimated $(estimate "$item")s)" | tee -a "$log"
  IFS=: read -r kind bench model <<<"$item"
  status=0
  case "$kind" in
    test)
      # A failing property is reported with its input; shrinking it is bounded (it spends the
      # lease) and nothing is written into the checkout there.
      PROPTEST_MAX_SHRINK_TIME=10000 PROPTEST_DISABLE_FAILURE_PERSISTENCE=1 timeout "$left" \
        "$bundle/tests/$bench" --test-threads="$(nproc)" >>"$log" 2>&1 || status=$?
      ;;
    ceilings) timeout "$left" "$bundle/benches/ceilings" >>"$log" 2>&1 || status=$? ;;
    bench)
      MOE_BENCH_MODELS=$model MOE_BENCH_TOKENS=$token_counts timeout "$left" "$bundle/benches/$bench" \
        --bench __gpu_records_only__ >>"$log" 2>&1 || status=$?
      ;;
    torch)
      PYTHONUNBUFFERED=1 timeout "$left" python3 scripts/torch_peers.py --model "$bench" --tokens "$token_counts" \
        >>"$log" 2>&1 || status=$?
      ;;
  esac
  echo "== $item: exit $status after $((SECONDS - began))s (estimated $(estimate "$item")s)" | tee -a "$log"
  if [ "$status" = 0 ]; then
    [ "$item" = ceilings ] || echo "$item" >>"$done_file"
  else
    failures=$((failures + 1))
  fi
}

failures=0
echo "gpu-validate: part $part of $parts, budget ${budget}s, into $out" | tee -a "$log"
ceilings_due=1
for line in "${plan_parts[@]}"; do
  read -r q _ item <<<"$line"
  [ "$q" = "$part" ] || continue
  # The ceilings after the tests, before the first timing (in every part: each may run on
  # another machine).
  if [ "$ceilings_due" = 1 ] && [ "${item%%:*}" != test ]; then
    run_item ceilings
    ceilings_due=0
  fi
  if grep -qx "$item" "$done_file"; then
    echo "== $item: done in an earlier run, skipped" | tee -a "$log"
    continue
  fi
  run_item "$item"
done

"$bundle/benchmarks_md" --device "$name" --driver "$driver" --date "$(date -u +%Y-%m-%d)" \
  --out "$out" "$log"
echo "gpu-validate: part $part done in $((SECONDS - start))s, $failures failed item(s); results in $out"
[ "$part" = "$parts" ] || echo "gpu-validate: next: scripts/gpu-validate.sh --part $((part + 1)) --out $out (same --budget)"
[ "$failures" = 0 ]
