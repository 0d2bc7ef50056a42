#!/bin/bash
# EBPO on 7B/8B models (Llama-3.1-8B, Qwen3-8B, Qwen2.5-7B) on one node of 8 H100 80GB:
# Megatron-Core TP 4 x PP 1 x DP 2, bf16 with Transformer Engine, colocated vLLM (TP 4).
# Config: examples/llama3.1_8b_ebpo.yaml (the paper's settings; its header has the memory table).
#
#   sbatch slurm/ebpo_8b_single_node.sh                      # from the repository root
#   EBPO_CONFIG=my_qwen3_8b.yaml sbatch slurm/ebpo_8b_single_node.sh
#   bash slurm/ebpo_8b_single_node.sh --dry-run [overrides]  # no GPU/Slurm needed
#
# Layout (python -m ebpo_megatron.planner --config examples/llama3.1_8b_ebpo.yaml --nodes 1):
#   per GPU, GiB: resident 29.18 (weights 3.74 + fp32 grads 7.48 + Adam 11.22 / DP 2 +
#   reference 3.74 + reserve 3.00), train phase 35.14, rollout phase 69.71 of 79.1
#   (vLLM 0.50 x 79.1 = 3.74 weights + 35.81 KV cache = 286 sequences of 4096 per engine).
#   TP 1 (DP 8) does not fit: 74 GiB resident before vLLM.
#
# One step is ~6.5 min at 40 % MFU and a checkpoint ~110 GB: signal 15 min before the limit.
#
#SBATCH --job-name=ebpo-llama8b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@900
#SBATCH --open-mode=append
#SBATCH --output=ebpo-llama8b-%j.out

set -euo pipefail

_here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
for EBPO_ROOT in "${EBPO_ROOT:-}" "$(dirname "$_here")" "${SLURM_SUBMIT_DIR:-}"; do
    [[ -n $EBPO_ROOT && -f $EBPO_ROOT/slurm/ebpo_launch.sh ]] && break
done
[[ -f $EBPO_ROOT/slurm/ebpo_launch.sh ]] || { echo "ebpo_8b_single_node.sh: cannot find the repository: submit from its root or set EBPO_ROOT" >&2; exit 2; }
export EBPO_ROOT

EBPO_DEFAULT_CONFIG=examples/llama3.1_8b_ebpo.yaml
EBPO_DEFAULT_NODES=1
EBPO_DEFAULT_GPUS_PER_NODE=8
EBPO_DEFAULT_CPUS_PER_TASK=12
EBPO_DEFAULT_JOB_NAME=ebpo-llama8b

# shellcheck source=slurm/ebpo_launch.sh
source "$EBPO_ROOT/slurm/ebpo_launch.sh"
ebpo_main "$@"
