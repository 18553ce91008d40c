#!/usr/bin/env bash
# Load benchmark of yc-iam-sidecar on this machine (issue 5): the sidecar's /token and metadata
# path against the floor of its own stack (examples/hyper_floor.rs) and against nginx serving the
# same token from a static file, and the sidecar on one thread against the current-thread floor;
# then peak RSS, CPU per 100k requests, idle CPU and context switches, start-to-ready time and
# the stripped binary size. Prints a markdown block at the end for docs/benchmarks.md.
#
# Usage: scripts/bench.sh [--install] [--help]
#
#   --install   apt-get install wrk nginx-light jq curl, and cargo install --locked oha, then run.
#
# Environment:
#   BENCH_SECONDS=10        duration of each load run
#   BENCH_IDLE_SECONDS=60   idle window for idle CPU and context switches
#   BENCH_CONNECTIONS="1 16 64"
#   BENCH_READY_RUNS=5      start-to-ready repetitions (median reported)
#   BENCH_ROUNDS=1          rounds of all load runs, targets interleaved; medians reported
#   BENCH_FLOOR_TIMER=0     1 adds a target: the hyper floor with the header-read timeout timer on
#   BENCH_LOADGEN=oha|wrk   force a load generator (default: oha if found, else wrk)
#   CARGO_TARGET_DIR        where cargo builds (default: target)
#
# Everything listens on 127.0.0.1 only; every run is bounded in time; every process started here
# is stopped on exit. The load generator runs on the same 2 cores as the server under test, so
# absolute figures are modest and noisy; the ratios are what to read.
set -euo pipefail
export LC_ALL=C
cd "$(dirname "$0")/.."

BENCH_SECONDS=${BENCH_SECONDS:-10}
BENCH_IDLE_SECONDS=${BENCH_IDLE_SECONDS:-60}
BENCH_CONNECTIONS=${BENCH_CONNECTIONS:-"1 16 64"}
BENCH_READY_RUNS=${BENCH_READY_RUNS:-5}
BENCH_ROUNDS=${BENCH_ROUNDS:-1}
BENCH_FLOOR_TIMER=${BENCH_FLOOR_TIMER:-0}
TARGET_DIR=${CARGO_TARGET_DIR:-target}
METADATA_PATH=/computeMetadata/v1/instance/service-accounts/default/token
KEY_FILE=tests/fixtures/sa-key-rsa2048.json

usage() { sed -n '2,24s/^# \{0,1\}//p' "$0"; }
say() { printf '==> %s\n' "$*" >&2; }
die() {
    printf 'bench.sh: %s\n' "$*" >&2
    exit 1
}

install=false
for arg in "$@"; do
    case $arg in
    --install) install=true ;;
    -h | --help)
        usage
        exit 0
        ;;
    *) die "unknown argument $arg (try --help)" ;;
    esac
done

if $install; then
    say "installing wrk, nginx-light, jq, curl (apt-get) and oha (cargo install --locked oha)"
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y wrk nginx-light jq curl
    command -v oha >/dev/null 2>&1 || cargo install --locked oha
fi

# --- tools -------------------------------------------------------------------------------------
missing=()
command -v curl >/dev/null 2>&1 || missing+=("curl: apt-get install curl")
loadgen=${BENCH_LOADGEN:-}
if [[ -z $loadgen ]]; then
    if command -v oha >/dev/null 2>&1 && command -v jq >/dev/null 2>&1; then
        loadgen=oha
    elif command -v wrk >/dev/null 2>&1; then
        loadgen=wrk
    else
        missing+=("a load generator: cargo install --locked oha (preferred; needs jq: apt-get install jq), or apt-get install wrk")
    fi
fi
NGINX=$(command -v nginx 2>/dev/null || true)
[[ -z $NGINX && -x /usr/sbin/nginx ]] && NGINX=/usr/sbin/nginx
if ((${#missing[@]})); then
    printf 'bench.sh: missing:\n' >&2
    printf '  - %s\n' "${missing[@]}" >&2
    printf 'Install them, or run scripts/bench.sh --install\n' >&2
    exit 1
fi
if [[ -z $NGINX ]]; then
    say "nginx not found: the nginx rows are skipped (apt-get install nginx-light, or --install)"
fi
LOADAVG_START=$(cut -d' ' -f1-3 /proc/loadavg)
say "load generator: $loadgen ($("$loadgen" --version 2>&1 | head -n1))"

# --- build -------------------------------------------------------------------------------------
say "cargo build --release (binary, hyper_floor, iam_emulator)"
cargo build --release --locked --bin yc-iam-sidecar --example hyper_floor --example iam_emulator
BIN=$TARGET_DIR/release/yc-iam-sidecar
FLOOR=$TARGET_DIR/release/examples/hyper_floor
EMULATOR=$TARGET_DIR/release/examples/iam_emulator
[[ -x $BIN && -x $FLOOR && -x $EMULATOR ]] || die "build outputs not found under $TARGET_DIR/release"

# --- processes and cleanup -----------------------------------------------------------------------
WORK=$(mktemp -d /tmp/yc-iam-bench.XXXXXX)
pids=()
cleanup() {
    local pid
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Stops one process started here and forgets it.
stop() {
    local pid=$1 kept=() p
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    for p in "${pids[@]}"; do
        [[ $p == "$pid" ]] || kept+=("$p")
    done
    pids=("${kept[@]}")
}

# A loopback port nobody listens on (checked by connecting to it).
free_port() {
    local port
    for _ in $(seq 200); do
        port=$((20000 + RANDOM % 40000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "$port"
            return 0
        fi
    done
    die "no free loopback port found"
}

now_us() { echo "${EPOCHREALTIME/./}"; }

# wait_http URL [max_seconds] [pid]: polls until 200; fails if pid dies or time runs out.
wait_http() {
    local url=$1 max=${2:-10} pid=${3:-} deadline
    deadline=$(($(now_us) + max * 1000000))
    until [[ $(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "$url" || true) == 200 ]]; do
        if [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null; then
            die "process $pid exited before $url answered 200"
        fi
        (($(now_us) < deadline)) || die "$url did not answer 200 within ${max}s"
    done
}

# cpu_ticks PID: utime+stime of the whole process (all threads, live and exited).
cpu_ticks() {
    local stat fields
    stat=$(<"/proc/$1/stat")
    stat=${stat##*) }
    read -r -a fields <<<"$stat"
    echo $((fields[11] + fields[12]))
}

# status_field PID FIELD: a numeric field of /proc/PID/status.
status_field() { awk -v f="$2:" '$1 == f { print $2 }' "/proc/$1/status"; }

# voluntary context switches summed over the process's threads.
ctxt_switches() {
    cat "/proc/$1"/task/*/status 2>/dev/null | awk '$1 == "voluntary_ctxt_switches:" { s += $2 } END { print s + 0 }'
}

thread_count() { status_field "$1" Threads; }

# --- servers -------------------------------------------------------------------------------------
# launch NAME PATH CMD...: starts CMD with 127.0.0.1:PORT (a free port) appended, logging to
# $WORK/NAME.log, and waits until PATH answers 200. Sets LAUNCHED_PORT and LAUNCHED_PID. Not run
# in a subshell, so the cleanup trap knows the process.
launch() {
    local name=$1 path=$2 port pid
    shift 2
    port=$(free_port)
    say "$name on 127.0.0.1:$port"
    "$@" "127.0.0.1:$port" >"$WORK/$name.log" 2>&1 &
    pid=$!
    pids+=("$pid")
    wait_http "http://127.0.0.1:$port$path" 30 "$pid"
    LAUNCHED_PORT=$port
    LAUNCHED_PID=$pid
}

launch sidecar /readyz "$BIN" dev --token-lifetime 1h --listen
SIDECAR_PORT=$LAUNCHED_PORT SIDECAR_PID=$LAUNCHED_PID
launch sidecar-ct /readyz env YC_IAM_SIDECAR_WORKER_THREADS=0 "$BIN" dev --token-lifetime 1h --listen
SIDECAR_CT_PORT=$LAUNCHED_PORT SIDECAR_CT_PID=$LAUNCHED_PID
launch floor / env HYPER_FLOOR_RUNTIME=multi "$FLOOR"
FLOOR_PORT=$LAUNCHED_PORT FLOOR_PID=$LAUNCHED_PID
launch floor-ct / env HYPER_FLOOR_RUNTIME=current "$FLOOR"
FLOOR_CT_PORT=$LAUNCHED_PORT FLOOR_CT_PID=$LAUNCHED_PID
FLOOR_TIMER_PID=
if [[ $BENCH_FLOOR_TIMER == 1 ]]; then
    launch floor-timer / env HYPER_FLOOR_RUNTIME=multi HYPER_FLOOR_HEADER_TIMEOUT=1 "$FLOOR"
    FLOOR_TIMER_PORT=$LAUNCHED_PORT FLOOR_TIMER_PID=$LAUNCHED_PID
fi

NGINX_PID=
if [[ -n $NGINX ]]; then
    NGINX_PORT=$(free_port)
    say "nginx (worker_processes 2, static token file) on 127.0.0.1:$NGINX_PORT"
    mkdir -p "$WORK/nginx/www" "$WORK/nginx/logs"
    curl -fsS -o "$WORK/nginx/www/token" "http://127.0.0.1:$SIDECAR_PORT/token"
    # nginx workers run as nobody when started as root: let them read the fake token.
    chmod 755 "$WORK" "$WORK/nginx" "$WORK/nginx/www"
    chmod 644 "$WORK/nginx/www/token"
    cat >"$WORK/nginx/nginx.conf" <<EOF
worker_processes 2;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/logs/error.log warn;
events { worker_connections 1024; }
http {
    access_log off;
    keepalive_timeout 65;
    keepalive_requests 100000000;
    client_body_temp_path $WORK/nginx/client_body;
    proxy_temp_path $WORK/nginx/proxy;
    fastcgi_temp_path $WORK/nginx/fastcgi;
    uwsgi_temp_path $WORK/nginx/uwsgi;
    scgi_temp_path $WORK/nginx/scgi;
    server {
        listen 127.0.0.1:$NGINX_PORT;
        root $WORK/nginx/www;
        location = /token { default_type "text/plain; charset=utf-8"; }
    }
}
EOF
    "$NGINX" -p "$WORK/nginx" -e "$WORK/nginx/logs/error.log" -c "$WORK/nginx/nginx.conf" \
        -g 'daemon off;' >"$WORK/nginx.out" 2>&1 &
    NGINX_PID=$!
    pids+=("$NGINX_PID")
    wait_http "http://127.0.0.1:$NGINX_PORT/token" 10 "$NGINX_PID"
    [[ $(curl -fsS "http://127.0.0.1:$NGINX_PORT/token") == "$(<"$WORK/nginx/www/token")" ]] ||
        die "nginx does not serve the token file"
fi

# --- load ----------------------------------------------------------------------------------------
# Per target:conns, space-separated values, one per round.
declare -A RPS P50 P99 FAILED

# load KEY CONNS URL [HEADER]: one keep-alive run of BENCH_SECONDS; appends its requests/s, p50
# and p99 (ms) and failures to the arrays, and sets LAST_TOTAL to the requests answered.
load() {
    local key=$1 conns=$2 url=$3 header=${4:-} out=$WORK/load.out threads rps p50 p99 failed
    local args=()
    [[ -n $header ]] && args+=(-H "$header")
    if [[ $loadgen == oha ]]; then
        oha -z "${BENCH_SECONDS}s" -c "$conns" --no-tui --output-format json "${args[@]}" "$url" >"$out"
        rps=$(jq -r '.summary.requestsPerSec' "$out")
        p50=$(jq -r '.latencyPercentiles.p50 * 1000' "$out")
        p99=$(jq -r '.latencyPercentiles.p99 * 1000' "$out")
        LAST_TOTAL=$(jq -r '[.statusCodeDistribution[]] | add // 0' "$out")
        # Requests cut by the deadline are not failures.
        failed=$(jq -r '([.statusCodeDistribution | to_entries[] | select(.key != "200") | .value] | add // 0)
            + ([.errorDistribution | to_entries[] | select(.key | test("deadline") | not) | .value] | add // 0)' "$out")
    else
        threads=$((conns < 2 ? conns : 2))
        wrk -t "$threads" -c "$conns" -d "${BENCH_SECONDS}s" --latency "${args[@]}" "$url" >"$out"
        rps=$(awk '$1 == "Requests/sec:" { print $2 }' "$out")
        p50=$(awk -f - "$out" <<'AWK'
function ms(v) { if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0; if (v ~ /s$/) return v * 1000; return v }
$1 == "50%" { print ms($2) }
AWK
        )
        p99=$(awk -f - "$out" <<'AWK'
function ms(v) { if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0; if (v ~ /s$/) return v * 1000; return v }
$1 == "99%" { print ms($2) }
AWK
        )
        LAST_TOTAL=$(awk '$2 == "requests" && $3 == "in" { print $1 }' "$out")
        failed=$(awk '/Non-2xx or 3xx responses:/ { n += $NF } /Socket errors:/ { gsub(/,/, ""); n += $4 + $6 + $8 + $10 } END { print n + 0 }' "$out")
    fi
    RPS[$key]+="$rps "
    P50[$key]+="$p50 "
    P99[$key]+="$p99 "
    FAILED[$key]+="$failed "
    printf '    %-14s c=%-3s %12.0f req/s  p50 %8.3f ms  p99 %8.3f ms  failed %s\n' \
        "$key" "$conns" "$rps" "$p50" "$p99" "$failed" >&2
}

median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
# med ARRAY KEY: the median of the values recorded in ARRAY[KEY].
med() {
    local -n values=$1
    local list
    read -r -a list <<<"${values[$2]}"
    median "${list[@]}"
}
# spread KEY: min-max of the requests/s recorded for KEY.
spread() {
    local list
    read -r -a list <<<"${RPS[$1]}"
    printf '%s\n' "${list[@]}" | sort -g | awk 'NR == 1 { lo = $1 } { hi = $1 } END { printf "%.0f–%.0f", lo, hi }'
}

TARGETS=(sidecar metadata sidecar-ct floor floor-ct)
[[ -n $FLOOR_TIMER_PID ]] && TARGETS+=(floor-timer)
[[ -n $NGINX_PID ]] && TARGETS+=(nginx)
url_of() {
    case $1 in
    sidecar) echo "http://127.0.0.1:$SIDECAR_PORT/token" ;;
    metadata) echo "http://127.0.0.1:$SIDECAR_PORT$METADATA_PATH" ;;
    sidecar-ct) echo "http://127.0.0.1:$SIDECAR_CT_PORT/token" ;;
    floor) echo "http://127.0.0.1:$FLOOR_PORT/token" ;;
    floor-ct) echo "http://127.0.0.1:$FLOOR_CT_PORT/token" ;;
    floor-timer) echo "http://127.0.0.1:$FLOOR_TIMER_PORT/token" ;;
    nginx) echo "http://127.0.0.1:$NGINX_PORT/token" ;;
    esac
}

CLK_TCK=$(getconf CLK_TCK)
max_conns=0
for c in $BENCH_CONNECTIONS; do ((c > max_conns)) && max_conns=$c; done
cpu_ticks=0
cpu_requests=0
say "load: ${BENCH_SECONDS}s per run, keep-alive, connections: $BENCH_CONNECTIONS, $BENCH_ROUNDS round(s), targets interleaved"
for round in $(seq "$BENCH_ROUNDS"); do
    ((BENCH_ROUNDS == 1)) || say "round $round of $BENCH_ROUNDS"
    for c in $BENCH_CONNECTIONS; do
        for target in "${TARGETS[@]}"; do
            header=
            [[ $target == metadata ]] && header='Metadata-Flavor: Google'
            ticks_before=$(cpu_ticks "$SIDECAR_PID")
            load "$target:$c" "$c" "$(url_of "$target")" "$header"
            if [[ $target == sidecar && $c == "$max_conns" ]]; then
                cpu_ticks=$((cpu_ticks + $(cpu_ticks "$SIDECAR_PID") - ticks_before))
                cpu_requests=$((cpu_requests + LAST_TOTAL))
            fi
        done
    done
done
PEAK_RSS_KB=$(status_field "$SIDECAR_PID" VmHWM)
CPU_MS_PER_100K=$(awk -v t="$cpu_ticks" -v hz="$CLK_TCK" -v n="$cpu_requests" \
    'BEGIN { printf "%.0f", (n > 0) ? t * 1000 / hz * 100000 / n : 0 }')

helpers=("$SIDECAR_CT_PID" "$FLOOR_PID" "$FLOOR_CT_PID")
[[ -n $FLOOR_TIMER_PID ]] && helpers+=("$FLOOR_TIMER_PID")
[[ -n $NGINX_PID ]] && helpers+=("$NGINX_PID")
for pid in "${helpers[@]}"; do stop "$pid"; done

# --- idle ----------------------------------------------------------------------------------------
say "idle: ${BENCH_IDLE_SECONDS}s with no requests"
idle_ticks0=$(cpu_ticks "$SIDECAR_PID")
idle_csw0=$(ctxt_switches "$SIDECAR_PID")
idle_main_csw0=$(status_field "$SIDECAR_PID" voluntary_ctxt_switches)
idle_threads0=$(thread_count "$SIDECAR_PID")
sleep "$BENCH_IDLE_SECONDS"
idle_ticks=$(($(cpu_ticks "$SIDECAR_PID") - idle_ticks0))
idle_csw=$(($(ctxt_switches "$SIDECAR_PID") - idle_csw0))
idle_main_csw=$(($(status_field "$SIDECAR_PID" voluntary_ctxt_switches) - idle_main_csw0))
idle_threads=$(thread_count "$SIDECAR_PID")
IDLE_CPU_PCT=$(awk -v t="$idle_ticks" -v hz="$CLK_TCK" -v s="$BENCH_IDLE_SECONDS" 'BEGIN { printf "%.3f", t / hz / s * 100 }')
IDLE_RES_PCT=$(awk -v hz="$CLK_TCK" -v s="$BENCH_IDLE_SECONDS" 'BEGIN { printf "%.3f", 1 / hz / s * 100 }')
if [[ $idle_threads != "$idle_threads0" ]]; then
    say "note: thread count changed during idle ($idle_threads0 -> $idle_threads): the context-switch sum may undercount"
fi
stop "$SIDECAR_PID"

# --- start to ready ------------------------------------------------------------------------------
# probe_ready PORT: true if GET /readyz answers 200. Uses bash's /dev/tcp, no fork: a curl
# process takes 5-30 ms just to start on this machine, too coarse for a 1 ms poll.
probe_ready() {
    local line=
    { exec 3<>"/dev/tcp/127.0.0.1/$1"; } 2>/dev/null || return 1
    printf 'GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n' >&3 2>/dev/null || true
    read -r -t 2 line <&3 2>/dev/null || true
    exec 3<&-
    [[ $line == "HTTP/1.1 200"* ]]
}

# ready_ms CMD...: ms from exec to the first /readyz 200 into READY_MS, polled back to back
# (about every 0.1-0.5 ms), then confirmed with curl outside the timing. Not run in a subshell,
# so the cleanup trap knows the process.
ready_ms() {
    local port pid t0 t1 deadline
    port=$(free_port)
    t0=$(now_us)
    "$@" --listen "127.0.0.1:$port" >>"$WORK/ready.log" 2>&1 &
    pid=$!
    pids+=("$pid")
    deadline=$((t0 + 30000000))
    until probe_ready "$port"; do
        kill -0 "$pid" 2>/dev/null || die "$* exited before /readyz answered 200: see $WORK/ready.log"
        (($(now_us) < deadline)) || die "$* not ready within 30s"
    done
    t1=$(now_us)
    wait_http "http://127.0.0.1:$port/readyz" 5 "$pid"
    stop "$pid"
    READY_MS=$(awk -v d=$((t1 - t0)) 'BEGIN { printf "%.1f", d / 1000 }')
}
EMU_PORT=$(free_port)
say "start to ready: serve --key-file $KEY_FILE against iam_emulator on 127.0.0.1:$EMU_PORT, $BENCH_READY_RUNS runs"
"$EMULATOR" "127.0.0.1:$EMU_PORT" "$KEY_FILE" >"$WORK/emulator.log" 2>&1 &
EMU_PID=$!
pids+=("$EMU_PID")
for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$EMU_PORT") 2>/dev/null && break
    kill -0 "$EMU_PID" 2>/dev/null || die "iam_emulator exited: $(<"$WORK/emulator.log")"
    sleep 0.05
done
serve_runs=()
for _ in $(seq "$BENCH_READY_RUNS"); do
    ready_ms "$BIN" serve --key-file "$KEY_FILE" --iam-endpoint "http://127.0.0.1:$EMU_PORT"
    serve_runs+=("$READY_MS")
done
stop "$EMU_PID"
say "start to ready: dev mode (generates an RSA-2048 key first), $BENCH_READY_RUNS runs"
dev_runs=()
for _ in $(seq "$BENCH_READY_RUNS"); do
    ready_ms "$BIN" dev --token-lifetime 1h
    dev_runs+=("$READY_MS")
done
READY_SERVE_MS=$(median "${serve_runs[@]}")
READY_DEV_MS=$(median "${dev_runs[@]}")

# --- size ----------------------------------------------------------------------------------------
SIZE_BYTES=$(stat -c %s "$BIN")
stripped=unknown
if command -v file >/dev/null 2>&1; then
    if file -b "$BIN" | grep -q 'not stripped'; then stripped=no; else stripped=yes; fi
fi

# --- report --------------------------------------------------------------------------------------
calc() { awk "BEGIN { printf \"%.2f\", $1 }"; }
ok() { if awk "BEGIN { exit !($1) }"; then echo met; else echo MISSED; fi; }
c=$max_conns
R_FLOOR=$(calc "$(med RPS "sidecar:$c") / $(med RPS "floor:$c")")
R_P99=$(calc "$(med P99 "sidecar:$c") / $(med P99 "floor:$c")")
R_NGINX=n/a
[[ -n $NGINX_PID ]] && R_NGINX=$(calc "$(med RPS "sidecar:$c") / $(med RPS "nginx:$c")")
R_CT=$(calc "$(med RPS "floor-ct:$c") / $(med RPS "floor:$c")")
R_SIDECAR_CT=$(calc "$(med RPS "sidecar-ct:$c") / $(med RPS "sidecar:$c")")
R_SIDECAR_CT_FLOOR=$(calc "$(med RPS "sidecar-ct:$c") / $(med RPS "floor-ct:$c")")
RSS_MIB=$(calc "$PEAK_RSS_KB / 1024")
SIZE_MB=$(calc "$SIZE_BYTES / 1000000")
SIZE_MIB=$(calc "$SIZE_BYTES / 1048576")
failed_total=0
for key in "${!FAILED[@]}"; do
    for n in ${FAILED[$key]}; do failed_total=$((failed_total + n)); done
done

cat <<EOF

## Results

Built from $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null || echo ' plus uncommitted changes to src/ or Cargo.*').
Machine: $(nproc) cores ($(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)), $(uname -sr); load generator: $loadgen on the same cores; ${BENCH_SECONDS}s per run, keep-alive, $BENCH_ROUNDS round(s) with targets interleaved (medians shown); idle window ${BENCH_IDLE_SECONDS}s; $(date -u +%Y-%m-%d); load average (1/5/15 min) at start $LOADAVG_START, at end $(cut -d' ' -f1-3 /proc/loadavg).
Failed requests (non-200 or errors) over all runs: $failed_total.

| target | conns | requests/s | req/s min–max | p50 ms | p99 ms |
| --- | ---: | ---: | ---: | ---: | ---: |
EOF
label() {
    case $1 in
    sidecar) echo "sidecar \`/token\`" ;;
    metadata) echo "sidecar metadata path" ;;
    sidecar-ct) echo "sidecar \`/token\`, one thread (\`YC_IAM_SIDECAR_WORKER_THREADS=0\`)" ;;
    floor) echo "hyper floor (multi-thread, 2 workers)" ;;
    floor-ct) echo "hyper floor (current-thread)" ;;
    floor-timer) echo "hyper floor + header-read timeout timer" ;;
    nginx) echo "nginx static file (2 workers)" ;;
    esac
}
for target in "${TARGETS[@]}"; do
    for c2 in $BENCH_CONNECTIONS; do
        printf '| %s | %s | %.0f | %s | %.3f | %.3f |\n' "$(label "$target")" "$c2" \
            "$(med RPS "$target:$c2")" "$(spread "$target:$c2")" \
            "$(med P50 "$target:$c2")" "$(med P99 "$target:$c2")"
    done
done
NGINX_MET=n/a
[[ -n $NGINX_PID ]] && NGINX_MET=$(ok "$R_NGINX >= 1.0")
cat <<EOF

| metric | measured | target | verdict |
| --- | ---: | ---: | --- |
| \`/token\` throughput at $c conns / hyper floor | $R_FLOOR × | ≥ 0.9 × | $(ok "$R_FLOOR >= 0.9") |
| \`/token\` throughput at $c conns / nginx | $R_NGINX × | ≥ 1.0 × | $NGINX_MET |
| \`/token\` p99 at $c conns / hyper floor p99 | $R_P99 × | ≤ 1.5 × | $(ok "$R_P99 <= 1.5") |
| peak RSS under load (VmHWM) | $RSS_MIB MiB | ≤ 16 MiB | $(ok "$RSS_MIB <= 16") |
| CPU time per 100k \`/token\` requests ($c conns) | $CPU_MS_PER_100K ms | — | — |
| idle CPU over ${BENCH_IDLE_SECONDS}s | $IDLE_CPU_PCT % ($idle_ticks ticks; resolution $IDLE_RES_PCT %) | ≤ 0.1 % | $(ok "$IDLE_CPU_PCT <= 0.1") |
| voluntary context switches while idle (all threads / main thread) | $idle_csw / $idle_main_csw | — | — |
| start to \`/readyz\` 200, \`serve\` against a loopback IAM (median of $BENCH_READY_RUNS) | $READY_SERVE_MS ms | ≤ 50 ms | $(ok "$READY_SERVE_MS <= 50") |
| start to \`/readyz\` 200, \`dev\` (RSA key generation included; median of $BENCH_READY_RUNS) | $READY_DEV_MS ms | — | — |
| release binary size (stripped: $stripped) | $SIZE_MB MB ($SIZE_MIB MiB) | ≤ 8 MB | $(ok "$SIZE_MB <= 8") |
| hyper floor current-thread / multi-thread, at $c conns | $R_CT × | — | — |
| sidecar one thread / two workers, at $c conns | $R_SIDECAR_CT × | — | — |
| sidecar one thread / hyper floor current-thread, at $c conns | $R_SIDECAR_CT_FLOOR × | — | — |
$([[ -n $FLOOR_TIMER_PID ]] && echo "| hyper floor with header-read timer / without, at $c conns | $(calc "$(med RPS "floor-timer:$c") / $(med RPS "floor:$c")") × | — | — |")

Start-to-ready runs (ms): serve ${serve_runs[*]}; dev ${dev_runs[*]}.
EOF
