#!/usr/bin/env bash
# Source this file: it makes sure a Python environment with this package and its extras exists, then
# activates it. By default it installs the tested lock, constraints.txt (every package at the version CI
# tested); the current `python` is used as it is when it already has everything and a supported transformers.
# Otherwise a venv is built at $PMOD_VENV (default: .venv in the repository) and reused while setup.py,
# requirements.txt, the lock and the pins are unchanged. torch is installed first and pinned, so no step pulls
# another torch build.
# Variables: PMOD_VENV, PMOD_FRESH=1 (rebuild), PYTHON (interpreter for a new venv),
# PMOD_TORCH_PINS (default "torch==2.14.1 torchvision==0.29.1": the builds on the project's CPU machines),
# PMOD_LOCK (default constraints.txt; "none": the newest versions setup.py allows, upgraded at every call, which
# is what a plain `pip install` gets today), PMOD_EXTRA_PINS (e.g. "transformers==5.17.0", with PMOD_LOCK=none).

pmod_repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# True when interpreter $1 imports this checkout's llava, a transformers inside the supported window, and every
# extra the demo and the tests need (lmms-eval's evaluator included: a broken dependency of it shows only there).
pmod_env_ready() {
    (cd "$pmod_repo" && "$1" -c "import pathlib, sys, transformers, llava, lmms_eval.evaluator, deepspeed, matplotlib, pytest, gradio, selenium
from pmod.hf_compat import SUPPORTED_TRANSFORMERS
sys.exit(pathlib.Path(llava.__file__).resolve().parents[1] != pathlib.Path.cwd()
         or transformers.__version__ not in SUPPORTED_TRANSFORMERS)") >/dev/null 2>&1
}

pmod_setup_env() {
    local venv=${PMOD_VENV:-$pmod_repo/.venv}
    local pins="${PMOD_TORCH_PINS:-torch==2.14.1 torchvision==0.29.1} ${PMOD_EXTRA_PINS:-}"
    local lock=${PMOD_LOCK:-$pmod_repo/constraints.txt}
    local stamp pins_file py
    local -a lock_args=()
    if [[ "$lock" != none ]]; then
        [[ -f "$lock" ]] || { echo "setup: no lock file $lock (PMOD_LOCK)" >&2; return 2; }
        lock_args=(-c "$lock")
    fi
    if [[ "${PMOD_FRESH:-0}" != 1 && "$lock" != none && -z "${PMOD_EXTRA_PINS:-}" ]] \
        && command -v python >/dev/null && pmod_env_ready python; then
        return 0
    fi
    py="$venv/bin/python"
    pins_file="$venv/pmod-pins.txt"
    stamp=$( { echo "$pins"; cat "$pmod_repo/setup.py" "$pmod_repo/requirements.txt";
               if [[ "$lock" != none ]]; then cat "$lock"; else echo none; fi; } | sha256sum | cut -d' ' -f1)
    if [[ "${PMOD_FRESH:-0}" == 1 || ! -x "$py" || "$(cat "$venv/.pmod-stamp" 2>/dev/null)" != "$stamp" ]]; then
        echo "setup: building the Python environment at $venv (a few minutes, once)"
        rm -rf "$venv"
        mkdir -p "$(dirname "$venv")"
        "${PYTHON:-python3}" -m venv "$venv"
        tr ' ' '\n' <<<"$pins" | grep . > "$pins_file"
        "$py" -m pip install -q --upgrade pip setuptools wheel
        # shellcheck disable=SC2046
        "$py" -m pip install -q "${lock_args[@]}" -c "$pins_file" $(cat "$pins_file")
        "$py" -m pip install -q "${lock_args[@]}" -c "$pins_file" -e "$pmod_repo[train,eval,dev,web]"
        echo "$stamp" > "$venv/.pmod-stamp"
    elif [[ "$lock" == none ]]; then
        echo "setup: upgrading $venv to the newest versions setup.py allows"
        "$py" -m pip install -q -U --upgrade-strategy eager -c "$pins_file" -e "$pmod_repo[train,eval,dev,web]"
    elif ! pmod_env_ready "$py"; then
        echo "setup: registering this checkout in $venv"
        "$py" -m pip install -q --no-deps --no-build-isolation -e "$pmod_repo"
    fi
    # shellcheck disable=SC1091
    source "$venv/bin/activate"
}

pmod_setup_env
