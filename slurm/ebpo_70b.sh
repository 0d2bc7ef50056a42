#!/bin/bash
# EBPO on Llama-3.1-70B-class models: 8 nodes x 8 H100 80GB, Megatron-Core TP 8 x PP 8 x DP 1,
# FP8 GEMMs (Transformer Engine), colocated vLLM rollouts (TP 8). Config:
# examples/llama3.1_70b_ebpo.yaml (its header has the planner's memory table for this layout).
#
#   sbatch slurm/ebpo_70b.sh                          # from the repository root
#   sbatch --nodes=16 slurm/ebpo_70b.sh               # more nodes -> more DP (TP 8 x PP 8 x DP 2)
#   sbatch slurm/ebpo_70b.sh rollout.max_new_tokens=2048     # trainer config overrides
#   bash slurm/ebpo_70b.sh --dry-run [overrides]      # no GPU/Slurm: validate + layout + memory
#
# Layout (python -m ebpo_megatron.planner --config examples/llama3.1_70b_ebpo.yaml --nodes 8):
#   per GPU, GiB: weights 2.24 + fp32 grads 4.47 + Adam 13.42 + FP8 cache 1.99 + reference 3.23
#   + reserve 3.00 = 28.36 resident; train phase 38.98 (selective recompute); rollout phase 73.82
#   (vLLM 0.55 x 79.1 GiB = 16.43 weights + 27.08 KV cache) of 79.1. 4 nodes (TP 8 x PP 4 x DP 1)
#   only fit with vLLM at 0.30 of the GPU (46 sequences in flight per engine): use 8 or more.
#
# Time limit and the checkpoint signal. The planner estimates one RL step at ~6 min (40 % MFU;
# ~9 min at 25 %), and a checkpoint is ~1 TB (bf16 weights + fp32 Adam state of 70.6 B params).
# The trainer checks for SIGUSR1 between steps, then saves; so the signal must come one step plus
# one save before the limit: 20 min (Slurm may send it up to a minute early).
# B: sends it to this batch shell only; the shell forwards it to the srun step (see
# slurm/ebpo_launch.sh) and requeues the job once the trainer has saved.
#
#SBATCH --job-name=ebpo-llama70b
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@1200
#SBATCH --open-mode=append
#SBATCH --output=ebpo-llama70b-%j.out
# --cpus-per-task: one eighth of a node's cores (12 fits 96-core nodes; the math reward runs in
# worker processes). --open-mode=append keeps one batch log across requeues (same job id); the
# ranks' own logs go to logs/<run name>/<job id>_restart<n>/rank<NNN>.log.

set -euo pipefail

# Under sbatch this file runs from Slurm's spool directory: find the repository through
# EBPO_ROOT, else this file's own checkout, else the submit directory.
_here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
for EBPO_ROOT in "${EBPO_ROOT:-}" "$(dirname "$_here")" "${SLURM_SUBMIT_DIR:-}"; do
    [[ -n $EBPO_ROOT && -f $EBPO_ROOT/slurm/ebpo_launch.sh ]] && break
done
[[ -f $EBPO_ROOT/slurm/ebpo_launch.sh ]] || { echo "ebpo_70b.sh: cannot find the repository: submit from its root or set EBPO_ROOT" >&2; exit 2; }
export EBPO_ROOT

# Defaults for --dry-run outside Slurm (inside a job Slurm's own variables win); keep them equal
# to the #SBATCH lines above.
EBPO_DEFAULT_CONFIG=examples/llama3.1_70b_ebpo.yaml
EBPO_DEFAULT_NODES=8
EBPO_DEFAULT_GPUS_PER_NODE=8
EBPO_DEFAULT_CPUS_PER_TASK=12
EBPO_DEFAULT_JOB_NAME=ebpo-llama70b

# shellcheck source=slurm/ebpo_launch.sh
source "$EBPO_ROOT/slurm/ebpo_launch.sh"
ebpo_main "$@"
