#!/bin/bash
# The project's experiment: full vs reduced latents, same data, classifier,
# autoencoders, seeds and prior budget.
#
#   bash launch/full_vs_reduced.sh configs/polymnist.py:cpu /tmp/exp5 [extra flags...]
#   bash launch/full_vs_reduced.sh configs/polymnist.py:cpu,m10 /tmp/exp10
#
# Runs the whole pipeline in W/full, then the reduce/prior/evaluate stages in
# W/reduced on the same data cache, classifier and autoencoders (linked from
# W/full, not retrained), and writes W/compare/{table.md,coherence.png}.
# Re-running resumes: finished stages are skipped.
set -euo pipefail
config=${1:?usage: full_vs_reduced.sh CONFIG WORKDIR [flags...]}
w=${2:?usage: full_vs_reduced.sh CONFIG WORKDIR [flags...]}
shift 2

python -m sbmae.main --config="$config" --workdir="$w/full" "$@"
mkdir -p "$w/reduced"
for shared in data classifier autoencoders; do
  ln -sfn "$(cd "$w/full/$shared" && pwd)" "$w/reduced/$shared"
done
python -m sbmae.main --config="$config" --workdir="$w/reduced" \
  --config.reduction.enabled=True "$@"
python -m sbmae.tools.compare --run="full:$w/full" --run="reduced:$w/reduced" --out="$w/compare"
