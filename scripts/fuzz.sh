#!/usr/bin/env bash
# Bounded fuzzing of yc-iam-sidecar (issue 4): runs each cargo-fuzz target in fuzz/ for a fixed
# time on a temporary copy of its seed corpus (fuzz/corpus/TARGET stays untouched), prints the
# executions per target and a summary line. Exits non-zero when a target crashes or breaks an
# invariant, naming the input that did it (kept under fuzz/artifacts/TARGET/, gitignored).
#
# Usage: scripts/fuzz.sh [SECONDS_PER_TARGET]     (default 20)
#
# Needs cargo-fuzz (`cargo install --locked cargo-fuzz`). Runs on the stable toolchain without
# a sanitizer (`-s none`): libFuzzer's coverage-guided search plus the targets' own assertions.
#
# Environment:
#   FUZZ_TARGETS="key_file config http_request"   targets to run
#   FUZZ_NICE=10                                   niceness of the build and the runs
#   FUZZ_RSS_LIMIT_MB=2048
#   FUZZ_KEEP=1                                    keep the temporary corpora and logs
#   FUZZ_SEED=1                                    fixed libFuzzer seed (repeatable runs; CI)
#   FUZZ_BUILD_ARGS="--codegen-units 16"           `cargo fuzz build/run` options. cargo-fuzz's
#                                                  own default is 1 codegen unit: that build took
#                                                  2.5x the CPU time here for ~20% more exec/s.
#                                                  Add "--target-dir DIR" to keep the build
#                                                  between fresh clones. Manual `cargo fuzz`
#                                                  commands must pass the same options, or they
#                                                  rebuild everything.
#
# Reproduce a finding: cargo fuzz run -s none --codegen-units 16 TARGET fuzz/artifacts/TARGET/crash-...
set -euo pipefail

seconds="${1:-20}"
case "$seconds" in
    '' | *[!0-9]*)
        echo "usage: $0 [SECONDS_PER_TARGET]" >&2
        exit 2
        ;;
esac
if [ "$seconds" -lt 1 ]; then
    echo "usage: $0 [SECONDS_PER_TARGET] (at least 1)" >&2
    exit 2
fi

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
read -r -a targets <<<"${FUZZ_TARGETS:-key_file config http_request}"
nice_level="${FUZZ_NICE:-10}"
rss_limit="${FUZZ_RSS_LIMIT_MB:-2048}"
read -r -a build_args <<<"${FUZZ_BUILD_ARGS-"--codegen-units 16"}"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: cargo-fuzz is missing; install it with: cargo install --locked cargo-fuzz" >&2
    exit 2
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/yc-iam-sidecar-fuzz.XXXXXX")"
cleanup() {
    if [ "${FUZZ_KEEP:-0}" = 1 ]; then
        echo "fuzz: kept $work"
    else
        rm -rf "$work"
    fi
}
trap cleanup EXIT

# One build for all targets (cargo fuzz run would otherwise check the build once per target).
echo "fuzz: building ${targets[*]} (cargo fuzz build -s none ${build_args[*]})"
build_start=$SECONDS
nice -n "$nice_level" cargo fuzz build -s none "${build_args[@]}" 2>"$work/build.log" || {
    tail -n 40 "$work/build.log" >&2
    echo "fuzz: the build failed" >&2
    exit 1
}
echo "fuzz: built in $((SECONDS - build_start)) s"

passed=0
failed=0
total=0
for target in "${targets[@]}"; do
    seeds="fuzz/corpus/$target"
    if [ ! -d "$seeds" ]; then
        echo "fuzz: $target: no seed corpus at $seeds" >&2
        failed=$((failed + 1))
        continue
    fi
    corpus="$work/corpus-$target"
    log="$work/$target.log"
    mkdir -p "$corpus"
    cp -R "$seeds/." "$corpus/"
    seeds_count="$(find "$seeds" -type f | wc -l)"

    status=0
    # FUZZ_SEED fixes libFuzzer's random seed (CI uses it so a run repeats); unset, it is random.
    seed_args=()
    if [ -n "${FUZZ_SEED:-}" ]; then
        seed_args=(-seed="$FUZZ_SEED")
    fi
    # -timeout: an input that runs this long counts as a crash (a hang in the product).
    nice -n "$nice_level" cargo fuzz run -s none "${build_args[@]}" "$target" "$corpus" -- \
        -max_total_time="$seconds" -rss_limit_mb="$rss_limit" -timeout=10 \
        -print_final_stats=1 "${seed_args[@]}" \
        >"$log" 2>&1 || status=$?

    # libFuzzer's closing lines: "#123456 DONE cov: ... exec/s: 2057 rss: ..." and
    # "stat::number_of_executed_units: 123456".
    runs="$(sed -n 's/^stat::number_of_executed_units: *\([0-9][0-9]*\).*/\1/p' "$log" | tail -n 1)"
    if [ -z "$runs" ]; then
        runs="$(sed -n 's/^#\([0-9][0-9]*\)[[:space:]].*/\1/p' "$log" | tail -n 1)"
    fi
    runs="${runs:-0}"
    rate="$(sed -n 's/^stat::average_exec_per_sec: *\([0-9][0-9]*\).*/\1/p' "$log" | tail -n 1)"
    cov="$(sed -n 's/^#[0-9]*[[:space:]]*DONE.* cov: \([0-9][0-9]*\).*/\1/p' "$log" | tail -n 1)"
    corpus_count="$(find "$corpus" -type f | wc -l)"
    total=$((total + runs))

    if [ "$status" -eq 0 ] && grep -q 'DONE' "$log"; then
        passed=$((passed + 1))
        echo "fuzz: $target: ok, $runs executions in ${seconds} s (${rate:-?} exec/s), cov ${cov:-?}, corpus $seeds_count -> $corpus_count inputs"
    else
        failed=$((failed + 1))
        artifact="$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n 1)"
        echo "fuzz: $target: FAILED (exit $status) after $runs executions" >&2
        # The panic message (or libFuzzer's reason) and the stack.
        grep -A 1 -E 'panicked at|^==[0-9]+== ERROR|^ALARM|out-of-memory' "$log" >&2 || true
        grep -v -E '^#[0-9]+[[:space:]]+(NEW|REDUCE|pulse|INITED|RELOAD)' "$log" | tail -n 40 >&2
        if [ -n "$artifact" ]; then
            echo "fuzz: $target: input saved to $artifact" >&2
            echo "fuzz: $target: reproduce with: cargo fuzz run -s none ${build_args[*]} $target $artifact" >&2
        else
            echo "fuzz: $target: no input was saved; full log: $log" >&2
            FUZZ_KEEP=1
        fi
    fi
done

echo "fuzz: $passed targets passed, $failed failed ($total executions)"
[ "$failed" -eq 0 ]
