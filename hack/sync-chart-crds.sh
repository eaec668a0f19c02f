#!/usr/bin/env bash
# Copies the canonical CRDs (crds/*.yaml) into the Helm chart, byte for byte, and removes chart
# CRDs that no longer exist in crds/. tests/unit/test_chart_crds.py fails until this has been run.
set -euo pipefail
source "$(dirname "$0")/lib/common.sh"

src=$REPO_ROOT/crds
dst=$REPO_ROOT/charts/checkpointer/crds
# A schedule's template is a ContainerCheckpoint spec: the same schema, generated.
python3 "$REPO_ROOT/hack/sync-schedule-template.py"
mkdir -p "$dst"
for stale in "$dst"/*.yaml; do
  [[ -e $stale ]] || continue
  [[ -e $src/$(basename "$stale") ]] || { rm -f -- "$stale"; log "removed $stale"; }
done
for crd in "$src"/*.yaml; do
  cp -- "$crd" "$dst/"
done
log "chart CRDs synced from crds/ ($(ls "$src"/*.yaml | wc -l) files)"
