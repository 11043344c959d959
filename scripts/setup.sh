#!/usr/bin/env bash
# Create (or bring up to date) the suite's virtual environment in .venv. Idempotent: a second run with the
# same requirements returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
COLOSSALAI_VERSION=0.5.0
stamp="$VENV/.suite-setup"
want="$(cat requirements.txt scripts/setup.sh | sha256sum | cut -c1-16) torch=$TORCH_VERSION"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    echo "setup: $VENV is up to date"
    exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
echo "setup: installing torch==$TORCH_VERSION"
pip install "torch==$TORCH_VERSION"
echo "setup: installing requirements.txt"
pip install -r requirements.txt
echo "setup: installing colossalai==$COLOSSALAI_VERSION without its pinned dependencies"
pip install --no-deps "colossalai==$COLOSSALAI_VERSION"
"$VENV/bin/python" -c "import colossalai.booster, colossalai.nn.optimizer, torch; print('setup: ok, torch', torch.__version__, 'colossalai', colossalai.__version__)"
echo "$want" > "$stamp"
