#!/bin/bash
# Polls the bench's server /metrics for the receive-wait histogram every second.
out=$1
while true; do
  pid=$(pgrep -f '^/tmp/srv-r18' | head -1)
  if [ -n "$pid" ]; then
    for port in $(ss -ltnpH | grep "pid=$pid," | awk '{print $4}' | sed 's/.*://'); do
      body=$(curl -s --max-time 2 http://127.0.0.1:$port/metrics 2>/dev/null)
      if echo "$body" | grep -q quic_receive_wait; then
        echo "=== $(date +%T.%N) port $port" >> $out
        echo "$body" | grep -E "quic_receive_wait|sessions_active |datagrams_received_total" >> $out
      fi
    done
  fi
  sleep 1
done
