#!/usr/bin/env bash
# Refresh constraints.txt, the lock that the README's commands install: build a brand-new venv with the newest
# versions setup.py and requirements.txt allow (the same code path as CI's newest pass), then write down every
# installed package but the torch build, which PMOD_TORCH_PINS chooses. Test what was locked with
# `PMOD_FRESH=1 bash scripts/test.sh`, and commit constraints.txt with the change that needed it
# (docs/install.md). Variables: PMOD_TORCH_PINS, PYTHON (as in scripts/setup_env.sh).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
work=$(mktemp -d -t pmod-lock.XXXXXX)
trap 'rm -rf "$work"' EXIT
PMOD_VENV="$work/venv" PMOD_LOCK=none PMOD_FRESH=1 PMOD_EXTRA_PINS="" source scripts/setup_env.sh
torch_build='^(torch|torchvision|torchaudio|triton|nvidia-[a-z0-9-]*|cuda-[a-z0-9-]*)=='
{
    echo "# The tested environment: exact versions of everything \`bash scripts/test.sh\` installs (the package with"
    echo "# its train, eval, dev and web extras), made by \`bash scripts/lock.sh\` on $(date -u +%Y-%m-%d) with"
    echo "# $(python --version) on $(uname -m), torch build: $(tr '\n' ' ' < "$work/venv/pmod-pins.txt")"
    echo "# The torch build is not pinned here: scripts/setup_env.sh installs \$PMOD_TORCH_PINS first."
    echo "# Use: pip install -c constraints.txt -e \".[train,eval,dev,web]\"  (docs/install.md)"
    python -m pip freeze --exclude-editable | grep -viE "$torch_build" | LC_ALL=C sort -f
} > constraints.txt.new
mv constraints.txt.new constraints.txt
echo "lock: wrote constraints.txt ($(grep -vc '^#' constraints.txt) packages; transformers $(python -c 'import transformers; print(transformers.__version__)'))"
