#!/usr/bin/env bash
# On the lent GPU machine: reassemble, install and build Transformer Engine from the parts that
# tools/gpu/te_fetch.py laid out (see tools/gpu/README.md for the sequence of device calls).
#   bash tools/gpu/te_build.sh stash   # in each call carrying one .teK part: keep it in /tmp/te-parts
#   bash tools/gpu/te_build.sh         # in the call carrying the last .teK (+ .whl): assemble, check, install, build
# Installs into /tmp/site (PYTHONPATH); idempotent: a machine that already imports TE 2.20.2 skips the work.
set -euo pipefail
PARTS=/tmp/te-parts SITE=${SITE:-/tmp/site}
mkdir -p "$PARTS"
for d in .te[0-9]*; do [ -d "$d" ] && cp -n "$d"/* "$PARTS"/ 2>/dev/null || true; done
[ "${1:-}" = stash ] && { ls -la "$PARTS"; exit 0; }

export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
if python3 -c "import transformer_engine as te, transformer_engine.pytorch, sys; sys.exit(0 if te.__version__.startswith('2.20.2') else 1)" 2>/dev/null; then
  echo "transformer_engine 2.20.2 already importable"; exit 0
fi
read -r wheel sum count < "$PARTS/MANIFEST"
have=$(ls "$PARTS"/part* | wc -l)
[ "$have" -eq "$count" ] || { echo "te_build: $have of $count parts in $PARTS; carry each .teK folder first" >&2; exit 1; }
cat "$PARTS"/part* > "/tmp/$wheel"
echo "$sum  /tmp/$wheel" | sha256sum -c --quiet || { echo "te_build: $wheel does not match its sha256" >&2; exit 1; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
  "/tmp/$wheel" "$PARTS"/*.whl $( [ -d .whl ] && ls .whl/*.whl )
build=$(mktemp -d) src=$(mktemp -d)
tar -xzf "$PARTS"/transformer_engine_torch-*.tar.gz -C "$src"
start=$(date +%s)
(cd "$src"/transformer_engine_torch-* && NVTE_PYTORCH_FORCE_BUILD=TRUE NVTE_CUDA_ARCHS=${NVTE_CUDA_ARCHS:-90} \
  MAX_JOBS=${MAX_JOBS:-16} python3 -m pip install -q --no-build-isolation --no-deps --no-index --target "$build" .)
# The build's transformer_engine/ folder holds only the extension: merge it into the python package, not over it.
cp -r "$build"/* "$SITE"/
echo "built transformer-engine-torch in $(( $(date +%s) - start )) s"
python3 -c "import transformer_engine as te, transformer_engine.pytorch; print('transformer_engine', te.__version__)"
