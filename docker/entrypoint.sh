#!/bin/sh
# Build the offline demo backbone and tasks into the volume on first start (PIGGYBACK_DEMO=1),
# then serve. With PIGGYBACK_DEMO=0, point PIGGYBACK_WEIGHTS and PIGGYBACK_STORE at your own.
set -e
if [ "${PIGGYBACK_DEMO:-0}" = "1" ]; then
  python -m training demo --out "$(dirname "$PIGGYBACK_WEIGHTS")"
fi
exec python -m service "$@"
