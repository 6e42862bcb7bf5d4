# Source on the lent GPU machine (repo root, wheels in .whl/): installs the carried wheels into /tmp/site once and
# puts them and the five packages' sources on PYTHONPATH.   source tools/gpu/env.sh
# (again whenever the carried set of wheels changes).
if [ -d .whl ] && [ "$(ls .whl)" != "$(cat /tmp/site/.whl-installed 2>/dev/null)" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && ls .whl > /tmp/site/.whl-installed || return 1
fi
export PYTHONPATH=/tmp/site:$PWD/packages/bridge-convert/src:$PWD/packages/bridge-data/src:$PWD/packages/bridge-train/src:$PWD/packages/bridge-peft/src:$PWD/packages/bridge-recipes/src
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-gpu-logs}; mkdir -p "$OUT"
