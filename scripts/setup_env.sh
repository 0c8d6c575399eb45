#!/usr/bin/env bash
# Source this file: it makes sure a Python environment with this package and its extras exists, then
# activates it. The current `python` is used as it is when it already has everything for this checkout.
# Otherwise a venv is built at $PMOD_VENV (default: .venv in the repository) and reused while setup.py and
# requirements.txt are unchanged. torch is installed first and pinned, so no step pulls another torch build.
# Variables: PMOD_VENV, PMOD_FRESH=1 (rebuild), PYTHON (interpreter for a new venv),
# PMOD_TORCH_PINS (default "torch==2.14.1 torchvision==0.29.1": the builds on the project's CPU machines).

pmod_repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# True when interpreter $1 imports this checkout's llava and every extra the demo and the tests need.
pmod_env_ready() {
    (cd "$pmod_repo" && "$1" -c "import pathlib, sys, llava, lmms_eval, deepspeed, matplotlib, pytest
sys.exit(pathlib.Path(llava.__file__).resolve().parents[1] != pathlib.Path.cwd())") >/dev/null 2>&1
}

pmod_setup_env() {
    local venv=${PMOD_VENV:-$pmod_repo/.venv}
    local pins=${PMOD_TORCH_PINS:-torch==2.14.1 torchvision==0.29.1}
    local stamp constraints
    if [[ "${PMOD_FRESH:-0}" != 1 ]] && command -v python >/dev/null && pmod_env_ready python; then
        return 0
    fi
    stamp=$( { echo "$pins"; cat "$pmod_repo/setup.py" "$pmod_repo/requirements.txt"; } | sha256sum | cut -d' ' -f1)
    if [[ "${PMOD_FRESH:-0}" == 1 || ! -x "$venv/bin/python" || "$(cat "$venv/.pmod-stamp" 2>/dev/null)" != "$stamp" ]]; then
        echo "setup: building the Python environment at $venv (a few minutes, once)"
        rm -rf "$venv"
        mkdir -p "$(dirname "$venv")"
        "${PYTHON:-python3}" -m venv "$venv"
        constraints=$(mktemp)
        tr ' ' '\n' <<<"$pins" > "$constraints"
        "$venv/bin/python" -m pip install -q --upgrade pip setuptools wheel
        # shellcheck disable=SC2086
        "$venv/bin/python" -m pip install -q -c "$constraints" $pins
        "$venv/bin/python" -m pip install -q -c "$constraints" -e "$pmod_repo[train,eval,dev]"
        rm -f "$constraints"
        echo "$stamp" > "$venv/.pmod-stamp"
    elif ! pmod_env_ready "$venv/bin/python"; then
        echo "setup: registering this checkout in $venv"
        "$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$pmod_repo"
    fi
    # shellcheck disable=SC1091
    source "$venv/bin/activate"
}

pmod_setup_env
