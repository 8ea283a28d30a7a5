#!/usr/bin/env bash
# Time the default CPU path of two checkouts with the same `python -m moelab bench` command, alternated round by
# round so a shared machine's drift lands on both alike. Each run imports moelab from its own checkout.
#
#   bash benchmarks/compare_checkouts.sh OLD_DIR NEW_DIR [ROUNDS] [OUT_DIR]
#   e.g.  git worktree add /tmp/old a0a9644 && bash benchmarks/compare_checkouts.sh /tmp/old . 5
#
# Prints the median over the rounds of each checkout's median time per shape, with its IQR, and new/old.
set -euo pipefail
old=$(cd "$1" && pwd); new=$(cd "$2" && pwd); rounds=${3:-5}; out=${4:-$(mktemp -d)}
py=${PYTHON:-$new/.venv/bin/python}
args=(-m moelab bench --tokens 128,2048 --experts 8 --top-k 2 --hidden 1024 --intermediate 512
      --dtype float32,bfloat16 --backends grouped_mm --no-memory --no-plots --quiet --min-run-time 1.0)
for round in $(seq 1 "$rounds"); do
  for side in old new; do
    dir=$old; [ "$side" = new ] && dir=$new
    (cd "$dir" && PYTHONPATH="$dir" "$py" "${args[@]}" --out "$out/$side-$round" > "$out/$side-$round.log")
  done
done
"$py" - "$out" "$rounds" <<'PY'
import sys
import pandas as pd
out, rounds = sys.argv[1], int(sys.argv[2])
frames = [pd.read_csv(f"{out}/{side}-{r}/sweep.csv").assign(side=side)
          for side in ("old", "new") for r in range(1, rounds + 1)]
d = pd.concat(frames)
g = d.groupby(["dtype", "num_tokens", "side"]).agg(median_ms=("median_ms", "median"), iqr_ms=("iqr_ms", "median"))
t = g.unstack("side")
t[("ratio", "new/old")] = t[("median_ms", "new")] / t[("median_ms", "old")]
print(t.round(3).to_string())
PY
