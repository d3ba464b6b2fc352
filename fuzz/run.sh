#!/usr/bin/env bash
# Runs every fuzz target (or the ones named) for SECONDS each, one after the
# other, starting from the committed seed corpora in fuzz/seeds/ (derived
# from test-vectors/) plus whatever fuzz/corpus/ gathered before.
#
#   fuzz/run.sh 600                      # each target 10 minutes
#   fuzz/run.sh 5 vote chat_message      # two targets, 5 s each
#
# Stable toolchains cannot build sanitizers, so it runs with
# `--sanitizer none`; a crash stops the script with the target's name and
# leaves the input in fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")"
seconds="${1:?usage: fuzz/run.sh SECONDS [TARGET...]}"
shift
if [ "$#" -eq 0 ]; then
  set -- $(cargo fuzz list)
fi
for target in "$@"; do
  mkdir -p "corpus/$target" "seeds/$target"
  echo "== fuzz $target for ${seconds}s"
  log="$(mktemp)"
  if ! cargo fuzz run --sanitizer none "$target" "corpus/$target" "seeds/$target" -- \
    -max_total_time="$seconds" -print_final_stats=1 >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "!! $target failed (a crash leaves its input in fuzz/artifacts/$target/)" >&2
    exit 1
  fi
  grep -E "^(Done|stat::number_of_executed_units)" "$log" || true
  rm -f "$log"
done
