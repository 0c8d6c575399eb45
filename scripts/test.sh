#!/usr/bin/env bash
# The test suite (CPU, offline): sets up the Python environment if needed, then runs pytest.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -x -k pmod`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
python -c "import torch, transformers; print('test: torch', torch.__version__, '| transformers', transformers.__version__)"
python -m pytest -q "$@"
