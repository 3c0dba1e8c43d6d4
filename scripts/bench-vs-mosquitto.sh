#!/usr/bin/env bash
# bench-vs-mosquitto.sh — smqtt against a plain Mosquitto deployment, on loopback.
#
# Starts a Mosquitto upstream broker and a Mosquitto bridge chain around it
# (local broker A ─bridge─▶ upstream ─bridge─▶ local broker B: the usual way to
# give each host its own broker without smqtt), then runs, side by side in each
# of RUNS runs:
#
#   direct            apps publish and subscribe on the upstream
#   protected         apps ─▶ smqtt sidecar ─▶ upstream ─▶ smqtt sidecar ─▶ apps,
#                     encrypted, the sidecars in session mode (the default)
#   protected-bridge  the same with the sidecars in bridge mode
#   chain             apps publish on A, subscribe on B
#
# with smqtt bench's apps (paho clients in its process; the sidecars of
# protected and protected-bridge run in that process too), and then the same
# four paths with an independent load generator, Mosquitto's own clients
# (mosquitto_pub -l -M INFLIGHT fed INDEP_MESSAGES lines, mosquitto_sub -C),
# through two `smqtt sidecar` processes per mode (configs in the work dir, a
# static group key from `smqtt keygen --group`, the generator's topics
# protected):
#
#   indep-direct, indep-protected, indep-protected-bridge, indep-chain
#
# The independent generator's msg/s is the messages received divided by the
# time from its first data publish to the subscriber's exit (after the last
# message); a probe message on the same topic first makes sure the whole path
# is subscribed. mosquitto_pub numbers its messages with 16-bit ids and
# mixes them up past 65,535 in one run, so INDEP_MESSAGES is at most 65,000.
#
# The bridges carry only the chain's topics (chain/#): the other scenarios
# publish under bench/ and indep/, so the upstream never copies their traffic
# to broker B, which would load the upstream and the machine for them alone.
#
# It prints the median of each figure, a column with each median's ratio to
# direct Mosquitto, and the ratios between the scenarios (each a median of the
# per-run ratios: the scenarios of one run ran side by side). CPU: smqtt bench
# reports its own process (apps, and the sidecars for protected); for chain
# the script adds the CPU that brokers A and B used, so protected and chain
# both count apps + per-host brokers. For the independent generator CPU is
# mosquitto_pub and mosquitto_sub plus, as the case may be, the two sidecar
# processes or brokers A and B. The upstream's CPU is counted in none of them.
#
# Settings (environment): MESSAGES (default 20000), QOS (1), SIZE (256),
# RATE (0: unlimited), RUNS (3), INDEP (1; 0 skips the independent
# generator), INDEP_MESSAGES (MESSAGES, at most 65000), INFLIGHT (1000, the
# bench's window; mosquitto_pub -M), INDEP_TIMEOUT (60: seconds the
# subscriber waits for a message), RESULTS (a file to append every run's
# JSON lines to, with a "run" key; default: none kept), SMQTT (a built smqtt binary; default:
# build one), MOSQUITTO (the mosquitto binary; mosquitto_pub and
# mosquitto_sub beside it or on PATH). Needs mosquitto and jq.
set -euo pipefail

MESSAGES=${MESSAGES:-20000}
QOS=${QOS:-1}
SIZE=${SIZE:-256}
RATE=${RATE:-0}
RUNS=${RUNS:-3}
INDEP=${INDEP:-1}
INDEP_MESSAGES=${INDEP_MESSAGES:-$((MESSAGES < 65000 ? MESSAGES : 65000))}
INFLIGHT=${INFLIGHT:-1000}
INDEP_TIMEOUT=${INDEP_TIMEOUT:-60}
MOSQUITTO=${MOSQUITTO:-$(command -v mosquitto || echo /usr/sbin/mosquitto)}

cd "$(dirname "$0")/.."
[ -x "$MOSQUITTO" ] || { echo "bench-vs-mosquitto: mosquitto not found (apt-get install mosquitto)" >&2; exit 1; }
command -v jq >/dev/null || { echo "bench-vs-mosquitto: jq not found (apt-get install jq)" >&2; exit 1; }
if [ "$INDEP" = 1 ]; then
  MOSQUITTO_PUB=$(command -v mosquitto_pub || echo "$(dirname "$MOSQUITTO")/mosquitto_pub")
  MOSQUITTO_SUB=$(command -v mosquitto_sub || echo "$(dirname "$MOSQUITTO")/mosquitto_sub")
  [ -x "$MOSQUITTO_PUB" ] && [ -x "$MOSQUITTO_SUB" ] ||
    { echo "bench-vs-mosquitto: mosquitto_pub or mosquitto_sub not found (apt-get install mosquitto-clients, or INDEP=0)" >&2; exit 1; }
  if [ "$INDEP_MESSAGES" -gt 65000 ] || [ "$INDEP_MESSAGES" -lt 1 ]; then
    echo "bench-vs-mosquitto: INDEP_MESSAGES=$INDEP_MESSAGES: want 1 to 65000 (mosquitto_pub's message ids wrap at 65,535)" >&2
    exit 1
  fi
  if [ "$RATE" != 0 ]; then
    echo "bench-vs-mosquitto: RATE applies to smqtt bench only; the independent generator runs unlimited" >&2
  fi
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/smqtt-bench-vs-mosquitto.XXXXXX")
pids=()
cleanup() {
  local pid
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${pids[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ -z "${SMQTT:-}" ]; then
  SMQTT="$work/smqtt"
  go build -o "$SMQTT" ./cmd/smqtt
fi

# free_port prints a loopback port nobody listens on, below the ephemeral
# ports (32768 and up) that the connections' local ends take.
free_port() {
  local p
  while :; do
    p=$((20000 + RANDOM % 12000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      echo "$p"
      return
    fi
  done
}

# wait_listen NAME PORT LOG: waits until something listens on PORT.
wait_listen() {
  local i
  for i in $(seq 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$2") 2>/dev/null; then
      return
    fi
    sleep 0.1
  done
  echo "bench-vs-mosquitto: $1 did not listen on $2:" >&2
  cat "$3" >&2
  exit 1
}

# start_mosquitto NAME PORT [EXTRA CONFIG]: runs a broker, waits until it listens.
start_mosquitto() {
  local name=$1 port=$2 extra=${3:-} conf="$work/$1.conf"
  {
    echo "listener $port 127.0.0.1"
    echo "allow_anonymous true"
    echo "persistence false"
    echo "max_inflight_messages 0"
    echo "max_queued_messages 0"
    echo "max_queued_bytes 0"
    echo "log_dest stderr"
    echo "log_type error"
    echo "log_type warning"
    # As root mosquitto would switch to the "mosquitto" user: stay root.
    if [ "$(id -u)" = 0 ]; then echo "user root"; fi
    printf '%s\n' "$extra"
  } >"$conf"
  "$MOSQUITTO" -c "$conf" 2>"$work/$name.log" &
  pids+=($!)
  wait_listen "mosquitto $name" "$port" "$work/$name.log"
}

bridge() { # bridge NAME DIRECTION
  cat <<EOF
connection $1
address 127.0.0.1:$up_port
topic chain/# $2 $QOS
try_private true
cleansession true
bridge_protocol_version mqttv311
notifications false
restart_timeout 1
EOF
}

up_port=$(free_port)
start_mosquitto upstream "$up_port"
a_port=$(free_port)
start_mosquitto chain-a "$a_port" "$(bridge chain-a out)"
a_pid=${pids[-1]}
b_port=$(free_port)
start_mosquitto chain-b "$b_port" "$(bridge chain-b in)"
b_pid=${pids[-1]}

# The independent generator's sidecars: two per mode, protecting indep/#
# with a static group key, outbound queue at sync: batch as in smqtt bench.
declare -A sc_port sc_pid
if [ "$INDEP" = 1 ]; then
  "$SMQTT" keygen --group -o "$work/indep.key" >/dev/null 2>&1
  for mode in session bridge; do
    for side in a b; do
      port=$(free_port)
      cat >"$work/sidecar-$mode-$side.yaml" <<EOF
sidecar:
  mode: $mode
  listen: ["tcp://127.0.0.1:$port"]
  upstream: {url: "tcp://127.0.0.1:$up_port", client_id: indep-sidecar-$mode-$side}
  static_keys: {indep: $work/indep.key}
  protect:
    - {topics: ["indep/#"], group: indep}
  data_dir: $work/sidecar-$mode-$side
  queue: {sync: batch}
EOF
      "$SMQTT" sidecar -c "$work/sidecar-$mode-$side.yaml" --log-level warn 2>"$work/sidecar-$mode-$side.log" &
      pids+=($!)
      sc_pid[$mode-$side]=$!
      sc_port[$mode-$side]=$port
      wait_listen "smqtt sidecar $mode-$side" "$port" "$work/sidecar-$mode-$side.log"
    done
  done
  # The generator's messages: INDEP_MESSAGES lines of SIZE-1 bytes (the
  # newline ends each), so that each payload is as long as smqtt bench's.
  line=$(head -c "$((SIZE - 1))" /dev/zero | tr '\0' x)
  yes "$line" | head -n "$INDEP_MESSAGES" >"$work/indep.lines" || true
fi

# cpu_ticks PID...: user + system clock ticks those processes used so far.
cpu_ticks() {
  local pid total=0 f
  for pid in "$@"; do
    read -ra f <"/proc/$pid/stat"
    # Fields 14 and 15 (utime, stime); the command name (field 2) has no spaces here.
    total=$((total + f[13] + f[14]))
  done
  echo "$total"
}
hz=$(getconf CLK_TCK)

# indep NAME PUB_PORT SUB_PORT TOPIC [PID...]: one independent-generator
# scenario; prints a JSON line like smqtt bench's (no latency). The PIDs'
# CPU while it runs is added to the clients'.
indep() {
  local name=$1 pp=$2 sp=$3 topic=$4
  shift 4
  local d="$work/indep-run"
  rm -rf "$d"
  mkdir "$d"
  mkfifo "$d/fifo"
  (
    # -C counts the probe too; -F %U prints one receive time per message.
    "$MOSQUITTO_SUB" -p "$sp" -t "$topic" -q "$QOS" -C "$((INDEP_MESSAGES + 1))" -W "$INDEP_TIMEOUT" -F %U >"$d/ts" 2>"$d/sub.err" &
    sub=$!
    "$MOSQUITTO_PUB" -p "$pp" -t "$topic" -q "$QOS" -l -M "$INFLIGHT" <"$d/fifo" 2>"$d/pub.err" &
    pub=$!
    exec 4>"$d/fifo"
    # The probe: one message through the whole path, subscriptions
    # included, before the measured ones (a probe published before the
    # subscriber's subscription is in place is dropped; another follows).
    ok=0
    for _ in $(seq 20); do
      echo probe >&4
      for _ in $(seq 20); do
        if [ -s "$d/ts" ]; then ok=1; break 2; fi
        sleep 0.05
      done
    done
    if [ "$ok" = 0 ]; then
      echo "bench-vs-mosquitto: $name: no probe message arrived:" >&2
      cat "$d/sub.err" "$d/pub.err" >&2
      exec 4>&-
      kill "$sub" "$pub" 2>/dev/null || true
      wait || true
      exit 0
    fi
    before=$(cpu_ticks "$@")
    t0=$(date +%s%N)
    cat "$work/indep.lines" >&4
    exec 4>&-
    wait "$sub" || true
    t1=$(date +%s%N)
    after=$(cpu_ticks "$@")
    wait "$pub" || true
    # The clients' CPU: the children of this subshell (mosquitto_pub,
    # mosquitto_sub and a few short commands).
    times >"$d/times" # in this shell: in a pipe it would be a subshell's
    clients=$(awk 'NR == 2 { t = 0; for (i = 1; i <= 2; i++) { split($i, a, /[ms]/); t += a[1] * 60 + a[2] }; print t }' "$d/times")
    received=$(($(wc -l <"$d/ts") - 1))
    jq -nc --arg name "$name" --argjson qos "$QOS" --argjson size "$SIZE" --argjson sent "$INDEP_MESSAGES" \
      --argjson received "$received" --argjson ns "$((t1 - t0))" --argjson clients "$clients" \
      --argjson others "$(echo "$after $before $hz" | awk '{printf "%.4f", ($1-$2)/$3}')" '
      {name: $name, topology: "indep", qos: $qos, size: $size, sent: $sent, received: $received,
       lost: ([$sent - $received, 0] | max), dup: null, ooo: null,
       msgs_per_s: (if $ns > 0 then $received / ($ns / 1e9) else 0 end),
       p50_us: null, p99_us: null,
       cpu_s_per_1k: (if $received > 0 then ($clients + $others) / $received * 1000 else 0 end), rss_mib: null}'
  )
}

load=(--qos "$QOS" --size "$SIZE" --messages "$MESSAGES" --rate "$RATE" --json)
echo "QoS $QOS, $SIZE-byte payloads, $MESSAGES messages (independent generator: $INDEP_MESSAGES, -M $INFLIGHT), rate ${RATE/#0/unlimited}, $RUNS runs; upstream mosquitto on :$up_port, chain A :$a_port → upstream → B :$b_port" >&2
results="$work/results.jsonl"
for run in $(seq "$RUNS"); do
  echo "run $run of $RUNS" >&2
  {
    "$SMQTT" bench "${load[@]}" --upstream "tcp://127.0.0.1:$up_port" --topologies direct,protected |
      sed -n 's/^BENCH //p'
    "$SMQTT" bench "${load[@]}" --upstream "tcp://127.0.0.1:$up_port" --topologies protected --mode bridge |
      sed -n 's/^BENCH //p'
    before=$(cpu_ticks "$a_pid" "$b_pid")
    line=$("$SMQTT" bench "${load[@]}" --topology chain --topic-root chain \
      --chain-pub "tcp://127.0.0.1:$a_port" --chain-sub "tcp://127.0.0.1:$b_port" | sed -n 's/^BENCH //p')
    after=$(cpu_ticks "$a_pid" "$b_pid")
    # Add the bridges' CPU to the chain's (per 1000 received).
    jq -c --argjson s "$(echo "$after $before $hz" | awk '{printf "%.4f", ($1-$2)/$3}')" \
      '.cpu_s_per_1k += (if .received > 0 then $s / .received * 1000 else 0 end)' <<<"$line"
    if [ "$INDEP" = 1 ]; then
      t="$RANDOM$RANDOM-$run"
      indep indep-direct "$up_port" "$up_port" "indep/$t/direct"
      indep indep-protected "${sc_port[session-a]}" "${sc_port[session-b]}" "indep/$t/session" "${sc_pid[session-a]}" "${sc_pid[session-b]}"
      indep indep-protected-bridge "${sc_port[bridge-a]}" "${sc_port[bridge-b]}" "indep/$t/bridge" "${sc_pid[bridge-a]}" "${sc_pid[bridge-b]}"
      indep indep-chain "$a_port" "$b_port" "chain/indep/$t" "$a_pid" "$b_pid"
    fi
  } | jq -c --argjson run "$run" '.run = $run' >>"$results"
done
if [ -n "${RESULTS:-}" ]; then
  cat "$results" >>"$RESULTS"
fi

jq -rs --arg runs "$RUNS" '
  def med: map(select(. != null)) | sort | if length == 0 then null elif length % 2 == 1 then .[length / 2 | floor] else (.[length / 2 - 1] + .[length / 2]) / 2 end;
  def f(k): map(.[k]) | med;
  def pad(n): tostring | (" " * n + .)[-n:];
  def num(d): if . == null then "-" else . * d | floor / d end;
  (group_by(.name) | map({name: .[0].name, sent: f("sent"), received: f("received"), lost: f("lost"), dup: f("dup"),
    msgs_per_s: f("msgs_per_s"), p50_us: f("p50_us"), p99_us: f("p99_us"), cpu_s_per_1k: f("cpu_s_per_1k"), rss_mib: f("rss_mib")})
    | map({(.name): .}) | add) as $by
  | (group_by(.run) | map(map({(.name): .}) | add)) as $perrun
  # ratio(a; b; k): the median over runs of a'"'"'s figure k over b'"'"'s in the same run.
  | def ratio($a; $b; $k): [$perrun[] | select(.[$a] and .[$b] and .[$a][$k] != null and .[$b][$k] != null and .[$b][$k] > 0) | .[$a][$k] / .[$b][$k]] | med;
    def rstr: if . == null then "-" else . * 100 | round / 100 | tostring end;
    def table($names; $direct):
      ["scenario                  received  lost  dup     msg/s  × direct   p50 ms   p99 ms  CPU s/1k  RSS MiB"]
      + ($names | map(select($by[.]) | $by[.] as $r |
        "\($r.name + " " * 24 | .[0:24]) \($r.received | pad(10)) \($r.lost | pad(5)) \($r.dup // "-" | pad(4)) \($r.msgs_per_s | floor | pad(9)) \(ratio($r.name; $direct; "msgs_per_s") | rstr | pad(9)) \($r.p50_us | if . == null then "-" else ./1000 | num(100) end | pad(8)) \($r.p99_us | if . == null then "-" else ./1000 | num(100) end | pad(8)) \($r.cpu_s_per_1k | num(10000) | pad(9)) \($r.rss_mib | if . == null then "-" else floor end | pad(8))"));
    def ratios($a; $against; $keys):
      ["\($a) as a ratio" + " " * 40 | .[0:34]] | map(. + ($against | map(" to " + . | pad(28)) | join("")))
      + ($keys | map(. as $k | "  \($k + " " * 32 | .[0:32])" + ($against | map(ratio($a; .; $k) | rstr | pad(28)) | join(""))));
  ["medians of \($runs) runs; ratios are medians of the per-run ratios (the scenarios of a run ran side by side)", "",
   "smqtt bench (paho apps in one process with the sidecars)"]
  + table(["direct", "protected", "protected-bridge", "chain"]; "direct")
  + ["", "(chain CPU includes brokers A and B; RSS is the smqtt bench process only)", ""]
  + ratios("protected"; ["direct", "protected-bridge", "chain"]; ["msgs_per_s", "p50_us", "p99_us", "cpu_s_per_1k"])
  + ratios("protected-bridge"; ["direct", "chain"]; ["msgs_per_s", "p50_us", "p99_us", "cpu_s_per_1k"])
  + ratios("chain"; ["direct"]; ["msgs_per_s", "p50_us", "p99_us", "cpu_s_per_1k"])
  + (if $by["indep-direct"] then
      ["", "independent generator (mosquitto_pub -l, mosquitto_sub -C; smqtt sidecar processes)"]
      + table(["indep-direct", "indep-protected", "indep-protected-bridge", "indep-chain"]; "indep-direct")
      + ["", "(CPU: mosquitto_pub and mosquitto_sub, plus the two sidecars or brokers A and B)", ""]
      + ratios("indep-protected"; ["indep-direct", "indep-protected-bridge", "indep-chain"]; ["msgs_per_s", "cpu_s_per_1k"])
      + ratios("indep-protected-bridge"; ["indep-direct", "indep-chain"]; ["msgs_per_s", "cpu_s_per_1k"])
      + ratios("indep-chain"; ["indep-direct"]; ["msgs_per_s", "cpu_s_per_1k"])
      + ["", "the two generators on direct Mosquitto"]
      + ratios("direct"; ["indep-direct"]; ["msgs_per_s"])
    else [] end)
  | .[]' "$results"
