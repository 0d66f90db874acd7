#!/usr/bin/env bash
# Fuzz lockhook's untrusted-input parsers with cargo-fuzz (libFuzzer).
#
#   tests/fuzz/run.sh [SECONDS_PER_TARGET]      (default 60)
#
# Targets (tests/fuzz/fuzz_targets/): domain_xml, holder_protocol. Set TARGETS="domain_xml" to
# run only some. The targets run one after the other, each on one core.
#
# KEEP_GOING=1 keeps fuzzing past crashes, timeouts and OOMs (libFuzzer -fork=1 -ignore_*=1; the
# findings still land in artifacts/ and still make the script fail). Use it while a known,
# unfixed bug (a regress-* seed that still crashes) would otherwise stop the run at once.
#
# Only stable Rust is needed: cargo-fuzz's nightly flags are enabled with RUSTC_BOOTSTRAP=1.
# Each target's working corpus (tests/fuzz/corpus/<target>, not committed) is refreshed from
# tests/fuzz/seeds/<target> (committed, including regress-* reproducers) before it runs.
# Crashes, timeouts and OOMs are written to tests/fuzz/artifacts/<target>/; the script exits
# non-zero if any target hit one (after running all of them).
set -uo pipefail

SECONDS_PER_TARGET="${1:-60}"
case "$SECONDS_PER_TARGET" in
    '' | *[!0-9]*) echo "usage: $0 [SECONDS_PER_TARGET]" >&2; exit 2 ;;
esac
TARGETS="${TARGETS:-domain_xml holder_protocol}"

FUZZ_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$FUZZ_DIR/../.." && pwd)"
FUZZ_REL="tests/fuzz"
export RUSTC_BOOTSTRAP=1
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked || { echo "cannot install cargo-fuzz" >&2; exit 2; }
fi

cd "$REPO" || exit 2

echo "== building fuzz targets"
for target in $TARGETS; do
    cargo fuzz build --fuzz-dir "$FUZZ_REL" "$target" || { echo "build of $target failed" >&2; exit 2; }
done

failed=0
summary=""
for target in $TARGETS; do
    corpus="$FUZZ_DIR/corpus/$target"
    artifacts="$FUZZ_DIR/artifacts/$target"
    log="$FUZZ_DIR/artifacts/$target.log"
    mkdir -p "$corpus" "$artifacts"
    cp -f "$FUZZ_DIR/seeds/$target"/* "$corpus"/
    before="$(find "$artifacts" -type f \( -name 'crash-*' -o -name 'timeout-*' -o -name 'oom-*' -o -name 'leak-*' \) | wc -l)"
    extra=()
    [ -f "$FUZZ_DIR/dict/$target.dict" ] && extra+=("-dict=$FUZZ_DIR/dict/$target.dict")
    [ "${KEEP_GOING:-0}" = 1 ] && extra+=(-fork=1 -ignore_crashes=1 -ignore_timeouts=1 -ignore_ooms=1)

    echo "== fuzzing $target for ${SECONDS_PER_TARGET}s (corpus $corpus, log $log)"
    start="$(date +%s)"
    cargo fuzz run --fuzz-dir "$FUZZ_REL" "$target" "$corpus" -- \
        -max_total_time="$SECONDS_PER_TARGET" -rss_limit_mb=2048 -timeout=5 -print_final_stats=1 \
        -artifact_prefix="$artifacts/" "${extra[@]}" 2>&1 | tee "$log" \
        | grep -vE --line-buffered '^#[0-9]+[[:space:]]+(NEW|REDUCE)[[:space:]]|^[[:space:]]+NEW_FUNC|# Uses: [0-9]+$' >&2
    status="${PIPESTATUS[0]}"
    elapsed=$(($(date +%s) - start))

    execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)"
    rate="$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)"
    peak="$(sed -n 's/^stat::peak_rss_mb: *//p' "$log" | tail -1)"
    done_line="$(grep -E '^Done [0-9]+ runs in [0-9]+ second' "$log" | tail -1)"
    if [ -z "$execs" ]; then
        # Fork mode (KEEP_GOING=1) prints no final stats; its last status line has the totals:
        # "#<execs>: cov: .. ft: .. corp: .. exec/s: <n> oom/timeout/crash: a/b/c time: <s>s ..."
        status_line="$(grep -E '^#[0-9]+: cov: ' "$log" | tail -1)"
        execs="$(sed -nE 's/^#([0-9]+): .*/\1/p' <<<"$status_line")"
        done_line="$(sed -nE 's/.* (oom\/timeout\/crash: [0-9\/]+ time: [0-9]+s).*/\1/p' <<<"$status_line")"
        secs="$(sed -nE 's/.* time: ([0-9]+)s.*/\1/p' <<<"$status_line")"
        [ -n "$execs" ] && [ "${secs:-0}" -gt 0 ] && rate=$((execs / secs))
    fi
    after="$(find "$artifacts" -type f \( -name 'crash-*' -o -name 'timeout-*' -o -name 'oom-*' -o -name 'leak-*' \) | wc -l)"
    size="$(find "$corpus" -type f | wc -l)"
    active="$(grep -oE ' corp: [0-9]+' "$log" | tail -1 | grep -oE '[0-9]+')"

    result="ok"
    if [ "$status" -ne 0 ] || [ "$after" -gt "$before" ] || grep -qE '^==[0-9]+== ERROR: libFuzzer|deadly signal|^SUMMARY: ' "$log"; then
        result="FAILED (exit $status; new artifacts: $((after - before)) in $artifacts)"
        failed=1
    fi
    line="$target: executions ${execs:-?}, time ${elapsed}s${done_line:+ ($done_line)}, ${rate:-?} exec/s, corpus $size files (${active:-?} in use), peak RSS ${peak:-?} MB: $result"
    echo "== $line"
    summary+="$line"$'\n'
done

echo
echo "== summary"
printf '%s' "$summary"
exit "$failed"
