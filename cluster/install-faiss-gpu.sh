#!/usr/bin/env bash
# Replace faiss-cpu (a dependency of aspkd-ray) with faiss-gpu in the current Python
# environment. Both wheels install the same `faiss` module, so one must go before the other
# comes; an extra cannot do that, hence this step in GPU images (cluster/Dockerfile) and on
# launcher nodes (cluster/ray-cluster.yaml). faiss-gpu 1.14.3+ wheels are CUDA 12 builds for
# Python 3.10+ that bring their CUDA runtime; the node needs an NVIDIA driver.
# `pip check` will name faiss-cpu as missing afterwards: expected, faiss-gpu provides it.
set -euo pipefail
PIP="${PIP:-python -m pip}"
SPEC="${FAISS_GPU_SPEC:-faiss-gpu==1.15.1}"
$PIP uninstall -y faiss-cpu
$PIP install --no-cache-dir "$SPEC"
python -c "import faiss; print('faiss', faiss.__version__, 'GPU build:', hasattr(faiss, 'StandardGpuResources'))"
