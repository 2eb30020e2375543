#!/usr/bin/env bash
# with_wheels.sh CMD...: run CMD with deepspeed, webdataset and ftfy importable: as installed, or else from the
# wheels that benchmarks/gpu/wheels.sh fetched into .whl/ (installed into /tmp/site). Used by run_all.sh for the
# train step, the only step that needs them.
set -uo pipefail
cd "$(dirname "$0")/../.."
if ! python3 -c "import deepspeed, webdataset, ftfy" 2>/dev/null; then
    if ! compgen -G ".whl/*.whl" > /dev/null; then
        echo "deepspeed/webdataset/ftfy are not installed and .whl/ holds no wheels: run bash benchmarks/gpu/wheels.sh" \
             "here first, then pass carry=[\".whl\"] to the device run" >&2
        exit 1
    fi
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "installing the wheels in .whl/ into /tmp/site failed (see pip's message above)" >&2; exit 1; }
    export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}/tmp/site"
fi
exec "$@"
