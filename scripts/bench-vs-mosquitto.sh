#!/usr/bin/env bash
# bench-vs-mosquitto.sh — smqtt against a plain Mosquitto deployment, on loopback.
#
# Starts a Mosquitto upstream broker and a Mosquitto bridge chain around it
# (local broker A ─bridge─▶ upstream ─bridge─▶ local broker B: the usual way to
# give each host its own broker without smqtt), then runs, RUNS times each:
#
#   direct     apps publish and subscribe on the upstream
#   protected  apps ─▶ smqtt sidecar ─▶ upstream ─▶ smqtt sidecar ─▶ apps (encrypted)
#   chain      apps publish on A, subscribe on B
#
# The bridges carry only the chain's topics (chain/#): direct and protected
# publish under bench/, so the upstream never copies their traffic to broker
# B, which would load the upstream and the machine for them alone.
#
# It prints the median of each figure, and protected's figures as ratios to
# direct and to chain. CPU: smqtt bench reports its own process (apps, and
# the sidecars for protected); for chain the script adds the CPU that brokers
# A and B used, so protected and chain both count apps + per-host brokers. The
# upstream's CPU is counted in none of them.
#
# Settings (environment): MESSAGES (default 20000), QOS (1), SIZE (256),
# RATE (0: unlimited), RUNS (3), SMQTT (a built smqtt binary; default: build
# one), MOSQUITTO (the mosquitto binary). Needs mosquitto and jq.
set -euo pipefail

MESSAGES=${MESSAGES:-20000}
QOS=${QOS:-1}
SIZE=${SIZE:-256}
RATE=${RATE:-0}
RUNS=${RUNS:-3}
MOSQUITTO=${MOSQUITTO:-$(command -v mosquitto || echo /usr/sbin/mosquitto)}

cd "$(dirname "$0")/.."
[ -x "$MOSQUITTO" ] || { echo "bench-vs-mosquitto: mosquitto not found (apt-get install mosquitto)" >&2; exit 1; }
command -v jq >/dev/null || { echo "bench-vs-mosquitto: jq not found (apt-get install jq)" >&2; exit 1; }

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

# free_port prints a loopback port nobody listens on.
free_port() {
  local p
  while :; do
    p=$((20000 + RANDOM % 20000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      echo "$p"
      return
    fi
  done
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
  local i
  for i in $(seq 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      return
    fi
    sleep 0.1
  done
  echo "bench-vs-mosquitto: mosquitto $name did not listen on $port:" >&2
  cat "$work/$name.log" >&2
  exit 1
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

load=(--qos "$QOS" --size "$SIZE" --messages "$MESSAGES" --rate "$RATE" --json)
echo "QoS $QOS, $SIZE-byte payloads, $MESSAGES messages, rate ${RATE/#0/unlimited}, $RUNS runs; upstream mosquitto on :$up_port, chain A :$a_port → upstream → B :$b_port" >&2
results="$work/results.jsonl"
for run in $(seq "$RUNS"); do
  echo "run $run of $RUNS" >&2
  "$SMQTT" bench "${load[@]}" --upstream "tcp://127.0.0.1:$up_port" --topologies direct,protected |
    sed -n 's/^BENCH //p' >>"$results"
  before=$(cpu_ticks "$a_pid" "$b_pid")
  line=$("$SMQTT" bench "${load[@]}" --topology chain --topic-root chain \
    --chain-pub "tcp://127.0.0.1:$a_port" --chain-sub "tcp://127.0.0.1:$b_port" | sed -n 's/^BENCH //p')
  after=$(cpu_ticks "$a_pid" "$b_pid")
  # Add the bridges' CPU to the chain's (per 1000 received).
  jq -c --argjson s "$(echo "$after $before $hz" | awk '{printf "%.4f", ($1-$2)/$3}')" \
    '.cpu_s_per_1k += (if .received > 0 then $s / .received * 1000 else 0 end)' <<<"$line" >>"$results"
done

jq -rs --arg runs "$RUNS" '
  def med: sort | if length % 2 == 1 then .[length / 2 | floor] else (.[length / 2 - 1] + .[length / 2]) / 2 end;
  def f(k): map(.[k]) | med;
  group_by(.name) | map({name: .[0].name, sent: f("sent"), received: f("received"), lost: f("lost"), dup: f("dup"),
    msgs_per_s: f("msgs_per_s"), p50_us: f("p50_us"), p99_us: f("p99_us"), cpu_s_per_1k: f("cpu_s_per_1k"), rss_mib: f("rss_mib")})
  | (map({(.name): .}) | add) as $by
  | ["medians of \($runs) runs", "", "scenario     received  lost  dup     msg/s   p50 ms   p99 ms  CPU s/1k  RSS MiB"]
  + (["direct", "chain", "protected"] | map(select($by[.]) | $by[.] |
      "\(.name | . + "            " | .[0:10]) \(.received | tostring | ("          " + .)[-10:]) \(.lost | tostring | ("     " + .)[-5:]) \(.dup | tostring | ("    " + .)[-4:]) \(.msgs_per_s | floor | tostring | ("         " + .)[-9:]) \(.p50_us / 1000 | . * 100 | floor / 100 | tostring | ("        " + .)[-8:]) \(.p99_us / 1000 | . * 100 | floor / 100 | tostring | ("        " + .)[-8:]) \(.cpu_s_per_1k | . * 10000 | floor / 10000 | tostring | ("         " + .)[-9:]) \(.rss_mib | floor | tostring | ("        " + .)[-8:])"))
  + ["", "(chain CPU includes brokers A and B; RSS is the smqtt bench process only)", "",
     "protected as a ratio     to direct   to chain"]
  + (["msgs_per_s", "p50_us", "p99_us", "cpu_s_per_1k"] | map(. as $k |
      def ratio(b): if $by[b] and $by[b][$k] > 0 then ($by.protected[$k] / $by[b][$k] * 100 | floor / 100 | tostring) else "-" end;
      "  \($k + "                    " | .[0:20]) \(ratio("direct") | ("          " + .)[-10:]) \(ratio("chain") | ("          " + .)[-10:])"))
  + ["", "chain as a ratio to direct"]
  + (["msgs_per_s", "p50_us", "p99_us"] | map(. as $k |
      "  \($k + "                    " | .[0:20]) \(if $by.direct[$k] > 0 then ($by.chain[$k] / $by.direct[$k] * 100 | floor / 100 | tostring) else "-" end | ("          " + .)[-10:])"))
  | .[]' "$results"
