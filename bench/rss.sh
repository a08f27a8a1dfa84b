#!/usr/bin/env bash
# Peak memory of `vhd convert` on a huge, almost empty disk.
#
#   bash bench/rss.sh                 # builds first; 64 GiB sparse raw image
#   BENCH_NO_BUILD=1 bash bench/rss.sh
#
# Environment:
#   BENCH_RSS_SIZE_GIB  virtual size of the sparse raw image (default 64, at least 18)
#   BENCH_DIR           directory to work in (default: $TMPDIR or /tmp); a temp dir is made inside
#   BENCH_RSS_GOAL_MIB  peak RSS goal (default 150)
#
# The raw image holds 4 MiB of random data at offset 0, 4 MiB at 17 GiB + 4096
# (straddling two 2 MiB blocks, not block aligned) and 1 MiB at the very end.
# It is converted raw → dynamic VHD and back VHD → raw with the built CLI, each
# under /usr/bin/time -v; the round trip must give back identical bytes. The
# figures also go to bench/results/rss.json, for `npm run bench:report`.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CLI="$ROOT/dist/src/cli/main.js"
SIZE_GIB=${BENCH_RSS_SIZE_GIB:-64}
GOAL_MIB=${BENCH_RSS_GOAL_MIB:-150}
MIB=$((1024 * 1024))
GIB=$((1024 * MIB))

if [ "$SIZE_GIB" -lt 18 ]; then echo "BENCH_RSS_SIZE_GIB must be at least 18" >&2; exit 2; fi
if [ "${BENCH_NO_BUILD:-}" != 1 ]; then (cd "$ROOT" && npm run build --silent); fi
if [ ! -x /usr/bin/time ]; then
  echo "installing GNU time (/usr/bin/time) ..." >&2
  apt-get install -y time >/dev/null
fi

DIR=$(mktemp -d "${BENCH_DIR:-${TMPDIR:-/tmp}}/vhdvault-rss-XXXXXX")
trap 'rm -rf "$DIR"' EXIT
RAW="$DIR/big.raw"
VHD="$DIR/big.vhd"
BACK="$DIR/back.raw"

# --- the sparse source ---------------------------------------------------------
truncate -s "${SIZE_GIB}G" "$RAW"
put() { # put <offset-bytes> <length-bytes>: random data, file size unchanged
  head -c "$2" /dev/urandom | dd of="$RAW" bs=64K iflag=fullblock oflag=seek_bytes seek="$1" conv=notrunc status=none
}
put 0 $((4 * MIB))
put $((17 * GIB + 4096)) $((4 * MIB))
put $((SIZE_GIB * GIB - MIB)) $MIB

fs=$(findmnt -n -o FSTYPE,SOURCE -T "$DIR" 2>/dev/null | awk '{print $1" on "$2}' || stat -f -c %T "$DIR")
echo "vhdvault peak-RSS benchmark — node $(node --version), $(nproc) CPUs, work dir $DIR ($fs)"
echo "source: $RAW, $SIZE_GIB GiB virtual, $(du -k "$RAW" | cut -f1) KiB allocated (4 MiB @0, 4 MiB @17 GiB+4096, 1 MiB @end)"
echo "goal: peak RSS <= $GOAL_MIB MiB"
echo

# --- measure ---------------------------------------------------------------------
ROWS=()
JSON_ROWS=()
measure() { # measure <label> <input> <output>
  local label=$1 in=$2 out=$3 log="$DIR/time.log" rc=0
  /usr/bin/time -v node "$CLI" vhd convert "$in" "$out" 2>"$log" || rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "FAILED ($label, exit $rc):" >&2
    cat "$log" >&2
    exit 1
  fi
  local kb elapsed user sys
  kb=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$log")
  elapsed=$(awk -F': ' '/Elapsed \(wall clock\) time/ {print $2}' "$log")
  user=$(awk -F': ' '/User time \(seconds\)/ {print $2}' "$log")
  sys=$(awk -F': ' '/System time \(seconds\)/ {print $2}' "$log")
  local mib verdict
  mib=$(awk -v k="$kb" 'BEGIN {printf "%.1f", k / 1024}')
  verdict=$(awk -v k="$kb" -v g="$GOAL_MIB" 'BEGIN {print (k / 1024 <= g) ? "met" : "NOT met"}')
  ROWS+=("$(printf '%-18s  %12s  %10s  %10s  %8s  %8s  %-8s  %s' "$label" "$kb" "$mib" "$elapsed" "$user" "$sys" "$verdict" "$(du -k "$out" | cut -f1)")")
  local seconds met
  seconds=$(awk -v e="$elapsed" 'BEGIN {n = split(e, p, ":"); s = 0; for (i = 1; i <= n; i++) s = s * 60 + p[i]; printf "%.2f", s}')
  met=$([ "$verdict" = met ] && echo true || echo false)
  JSON_ROWS+=("{\"operation\":\"$label\",\"maxRssKiB\":$kb,\"maxRssMiB\":$mib,\"elapsedSeconds\":$seconds,\"userSeconds\":$user,\"systemSeconds\":$sys,\"meetsGoal\":$met}")
}

measure "raw -> dynamic vhd" "$RAW" "$VHD"
measure "vhd -> raw" "$VHD" "$BACK"

printf '%-18s  %12s  %10s  %10s  %8s  %8s  %-8s  %s\n' operation "max RSS KiB" "max RSS MiB" "elapsed" "user s" "sys s" "goal" "output KiB on disk"
printf '%-18s  %12s  %10s  %10s  %8s  %8s  %-8s  %s\n' ------------------ ------------ ---------- ---------- -------- -------- -------- ------------------
for row in "${ROWS[@]}"; do echo "$row"; done
echo
echo "big.vhd: $(stat -c %s "$VHD") bytes; back.raw: $(stat -c %s "$BACK") bytes (source $(stat -c %s "$RAW"))"

# --- verify the round trip -----------------------------------------------------------
start=$(date +%s.%N)
if cmp "$RAW" "$BACK"; then
  verdict="identical (cmp)"
else
  verdict="DIFFERENT"
fi
end=$(date +%s.%N)
echo "round trip raw -> vhd -> raw: $verdict, checked in $(awk -v a="$start" -v b="$end" 'BEGIN {printf "%.1f", b - a}') s"
if command -v qemu-img >/dev/null; then
  if qemu-img compare -q -f raw -F vpc "$RAW" "$VHD"; then
    echo "qemu-img compare big.raw big.vhd: identical"
  else
    echo "qemu-img compare big.raw big.vhd: DIFFERENT"
    verdict="DIFFERENT"
  fi
fi
[ "$verdict" != "DIFFERENT" ] || exit 1

# --- results for docs/performance.md ---------------------------------------------------
data_kib=$(du -k "$RAW" | cut -f1)
RSS_PARAMS="{\"sizeGiB\":$SIZE_GIB,\"dataMiB\":$((data_kib / 1024)),\"goalMiB\":$GOAL_MIB}" \
RSS_ROWS="[$(IFS=,; echo "${JSON_ROWS[*]}")]" \
  node --input-type=module -e "
    import { writeResults } from '$ROOT/dist/bench/lib.js';
    await writeResults('rss', JSON.parse(process.env.RSS_PARAMS), JSON.parse(process.env.RSS_ROWS), { command: 'bash bench/rss.sh' });
  "
