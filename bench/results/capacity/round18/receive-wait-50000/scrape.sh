#!/bin/bash
# Polls the benchmark's server /metrics for the receive-wait histogram (BENCHMARKS.md,
# eighteenth round) every INTERVAL seconds, appending to OUT.
# usage: scrape.sh OUT SERVER_BINARY_PATH [INTERVAL]   (5 s at the 20,000 point, 1 s at 50,000)
out=$1 binary=$2 interval=${3:-1}
while true; do
  pid=$(pgrep -f "^$binary" | head -1)
  if [ -n "$pid" ]; then
    for port in $(ss -ltnpH | grep "pid=$pid," | awk '{print $4}' | sed 's/.*://'); do
      body=$(curl -s --max-time 2 "http://127.0.0.1:$port/metrics" 2>/dev/null)
      if echo "$body" | grep -q quic_receive_wait; then
        echo "=== $(date +%T.%N) port $port" >> "$out"
        echo "$body" | grep -E "quic_receive_wait|sessions_active |datagrams_received_total" >> "$out"
      fi
    done
  fi
  sleep "$interval"
done
