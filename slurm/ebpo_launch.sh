# shellcheck shell=bash
# Shared launch logic of the EBPO Slurm jobs (slurm/ebpo_70b.sh, slurm/ebpo_8b_single_node.sh).
# Sourced, not run: the job script sets EBPO_DEFAULT_* and calls `ebpo_main "$@"`.
#
#   sbatch slurm/ebpo_70b.sh [dotted.key=value ...]       submit (from the repository root)
#   bash   slurm/ebpo_70b.sh --dry-run [key=value ...]    anywhere: no GPU, no Slurm needed
#
# What a job does:
#   1. Resolves the layout from Slurm's environment (nodes, GPUs per node, node list) and checks
#      it with the planner (python -m ebpo_megatron.planner): an impossible layout or a plan that
#      does not fit in GPU memory stops here, before any GPU is touched. --dry-run stops after it.
#   2. Exports the rendezvous: MASTER_ADDR = first host of `scontrol show hostnames
#      $SLURM_JOB_NODELIST`, MASTER_PORT from the job id. Each task reads its rank from
#      SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID (parallel.distributed.launch_info); RANK and
#      WORLD_SIZE are deliberately not exported (they would win over Slurm's per-task values).
#   3. Starts `srun` (one task per GPU) in the background and `wait`s. SIGUSR1 (sent by Slurm to
#      this batch shell, #SBATCH --signal=B:USR1@<lead>) is forwarded to the srun step, which
#      delivers it to every rank; the trainer finishes its step, saves a checkpoint, exits 0.
#      The job then requeues itself (scontrol requeue) and the next start resumes from the
#      latest checkpoint of the same run directory (runs/<run name>, stable across requeues).
#
# Environment knobs (all optional):
#   EBPO_ROOT            repository root (default: this script's repo, else $SLURM_SUBMIT_DIR)
#   EBPO_CONFIG          trainer YAML (default: the job script's example config)
#   EBPO_PYTHON          interpreter (default: $EBPO_ROOT/.venv/bin/python, else python3)
#   EBPO_RUN_NAME        run name = run directory name (default: $SLURM_JOB_NAME)
#   EBPO_RUN_ROOT        parent of run directories (default: $EBPO_ROOT/runs)
#   EBPO_LOG_ROOT        parent of per-job log directories (default: $EBPO_ROOT/logs)
#   EBPO_MODEL_CKPT      Megatron dist checkpoint of the initial weights -> model.checkpoint
#   EBPO_HF_DIR          Hugging Face dir (tokenizer, config.json for vLLM) -> data.tokenizer_dir
#   EBPO_TRAIN_FILES     comma-separated jsonl/parquet files -> data.train_files
#   EBPO_EVAL_FILES      comma-separated jsonl/parquet files -> data.eval_files
#   EBPO_MAX_RESTARTS    stop requeueing after this many restarts (default 50)
#   EBPO_IGNORE_PLAN=1   launch even when the planner says the plan does not fit in memory
#   MASTER_PORT, OMP_NUM_THREADS, NCCL_* as usual.

ebpo_die() {
    echo "ebpo-launch: error: $*" >&2
    exit 2
}

ebpo_log() {
    echo "[ebpo-launch $(date '+%Y-%m-%d %H:%M:%S')] $*"
}

# First host of a Slurm node list without scontrol: "gpu[003-005,010],cpu1" -> gpu003.
ebpo_first_host() {
    local list=$1 head
    head=${list%%,*}
    if [[ $head == *"["* ]]; then
        local prefix=${list%%\[*} ranges=${list#*\[}
        ranges=${ranges%%\]*}
        ranges=${ranges%%,*}
        echo "${prefix}${ranges%%-*}"
    else
        echo "$head"
    fi
}

ebpo_master_addr() {
    local nodelist=$1 host="" hosts=""
    if command -v scontrol >/dev/null 2>&1; then
        # whole output first: `| head -n 1` could SIGPIPE scontrol and fail under pipefail
        hosts=$(scontrol show hostnames "$nodelist" 2>/dev/null) || hosts=""
        host=${hosts%%$'\n'*}
    fi
    [[ -n $host ]] || host=$(ebpo_first_host "$nodelist")
    echo "$host"
}

# A YAML flow list from a comma-separated value: "a.parquet,b.parquet" -> [a.parquet, b.parquet]
ebpo_yaml_list() {
    local IFS=,
    # shellcheck disable=SC2206
    local items=($1)
    local out="" item
    for item in "${items[@]}"; do
        out+="${out:+, }${item}"
    done
    echo "[${out}]"
}

# NCCL and CUDA settings for multi-node H100 (InfiniBand). Only generic, safe defaults are set;
# the fabric-specific ones are placeholders: export them in your environment (or here) for your
# cluster, `NCCL_DEBUG=INFO` prints what NCCL picked.
ebpo_export_env() {
    # Megatron: with TP communication overlap (sequence parallelism) the kernels must be issued
    # in order on one hardware queue, so the all-gather/reduce-scatter overlaps the GEMMs.
    export CUDA_DEVICE_MAX_CONNECTIONS=1
    # NCCL_SOCKET_IFNAME: interface for NCCL's bootstrap and socket traffic, e.g. "ib0", "bond0",
    #   "eth0"; the default excludes only loopback and docker bridges.
    export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-^lo,docker0}"
    # NCCL_IB_HCA: the InfiniBand/RoCE adapters, e.g. "mlx5_0,mlx5_1,mlx5_2,mlx5_3,mlx5_6,mlx5_7,mlx5_8,mlx5_9"
    #   or "=mlx5_0:1"; unset = every active HCA (NCCL's choice, usually right).
    [[ -n ${NCCL_IB_HCA:-} ]] && export NCCL_IB_HCA
    # NCCL_IB_GID_INDEX: RoCE only (often 3); NCCL_IB_SL / NCCL_IB_TC: the fabric's service level.
    [[ -n ${NCCL_IB_GID_INDEX:-} ]] && export NCCL_IB_GID_INDEX
    [[ -n ${NCCL_IB_SL:-} ]] && export NCCL_IB_SL
    [[ -n ${NCCL_IB_TC:-} ]] && export NCCL_IB_TC
    # Longer IB timeout/retries: a 70B checkpoint write or a slow rank must not kill the job.
    export NCCL_IB_TIMEOUT="${NCCL_IB_TIMEOUT:-22}"
    export NCCL_IB_RETRY_CNT="${NCCL_IB_RETRY_CNT:-7}"
    export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
    # A failed collective raises instead of hanging until the time limit.
    export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
    export TORCH_NCCL_AVOID_RECORD_STREAMS="${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}"
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
    export TOKENIZERS_PARALLELISM=false
    export PYTHONUNBUFFERED=1
    export PYTHONPATH="${EBPO_ROOT}${PYTHONPATH:+:$PYTHONPATH}"
    # vLLM's sleep mode (colocated rollouts) cannot work with expandable segments.
    if [[ ${PYTORCH_CUDA_ALLOC_CONF:-} == *"expandable_segments:True"* ]]; then
        ebpo_die "PYTORCH_CUDA_ALLOC_CONF=$PYTORCH_CUDA_ALLOC_CONF: vLLM's sleep mode refuses expandable segments; unset it"
    fi
}

ebpo_main() {
    local dry_run=0
    local -a user_overrides=()
    while (($#)); do
        case $1 in
            --dry-run) dry_run=1 ;;
            -h | --help)
                sed -n '2,40p' "${BASH_SOURCE[0]}"
                return 0
                ;;
            -*) ebpo_die "unknown argument '$1' (expected --dry-run or dotted.key=value config overrides; set nodes with sbatch --nodes)" ;;
            *=*) user_overrides+=("$1") ;;
            *) ebpo_die "unknown argument '$1' (expected --dry-run or dotted.key=value config overrides)" ;;
        esac
        shift
    done

    # ---------------------------------------------------------------- repository, python, config
    [[ -d "$EBPO_ROOT/ebpo_megatron" ]] || ebpo_die "EBPO_ROOT=$EBPO_ROOT does not hold ebpo_megatron/"
    cd "$EBPO_ROOT" || ebpo_die "cannot cd to $EBPO_ROOT"
    local python=${EBPO_PYTHON:-}
    if [[ -z $python ]]; then
        if [[ -x "$EBPO_ROOT/.venv/bin/python" ]]; then python="$EBPO_ROOT/.venv/bin/python"; else python=python3; fi
    fi
    local config=${EBPO_CONFIG:-$EBPO_DEFAULT_CONFIG}
    [[ -f $config ]] || ebpo_die "config $config not found (relative paths are from $EBPO_ROOT)"

    # ---------------------------------------------------------------- layout from Slurm (faked for --dry-run)
    local nnodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-$EBPO_DEFAULT_NODES}}
    local gpus=${SLURM_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-$EBPO_DEFAULT_GPUS_PER_NODE}}
    gpus=${gpus##*:}  # "h100:8" -> 8
    [[ $nnodes =~ ^[0-9]+$ && $gpus =~ ^[0-9]+$ ]] || ebpo_die "cannot read nodes ($nnodes) / GPUs per node ($gpus)"
    local tasks_per_node=${SLURM_NTASKS_PER_NODE:-$gpus}
    ((tasks_per_node == gpus)) || ebpo_die "--ntasks-per-node ($tasks_per_node) must equal --gpus-per-node ($gpus): one rank per GPU"
    local world=$((nnodes * gpus))
    if [[ -n ${SLURM_NTASKS:-} ]] && ((SLURM_NTASKS != world)); then
        ebpo_die "SLURM_NTASKS=$SLURM_NTASKS but nodes x GPUs = $nnodes x $gpus = $world"
    fi
    local nodelist=${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-localhost}}
    local job_name=${SLURM_JOB_NAME:-$EBPO_DEFAULT_JOB_NAME}
    local job_id=${SLURM_JOB_ID:-dryrun}
    local restart=${SLURM_RESTART_COUNT:-0}
    export MASTER_ADDR
    MASTER_ADDR=${MASTER_ADDR:-$(ebpo_master_addr "$nodelist")}
    local port_base=${SLURM_JOB_ID:-0}
    [[ $port_base =~ ^[0-9]+$ ]] || port_base=0
    export MASTER_PORT=${MASTER_PORT:-$((20000 + port_base % 20000))}

    # ---------------------------------------------------------------- run directory and logs
    # The run directory must not change across requeues: the trainer resumes from its latest
    # checkpoint there. The job id is kept by a requeue; the job name is the default run name.
    local run_name=${EBPO_RUN_NAME:-$job_name}
    local run_root=${EBPO_RUN_ROOT:-$EBPO_ROOT/runs}
    local log_dir=${EBPO_LOG_ROOT:-$EBPO_ROOT/logs}/$run_name/${job_id}_restart${restart}
    local -a overrides=("run.name=$run_name" "run.output_dir=$run_root" "run.resume=true")
    [[ -n ${EBPO_MODEL_CKPT:-} ]] && overrides+=("model.checkpoint=$EBPO_MODEL_CKPT")
    [[ -n ${EBPO_HF_DIR:-} ]] && overrides+=("data.tokenizer_dir=$EBPO_HF_DIR")
    [[ -n ${EBPO_TRAIN_FILES:-} ]] && overrides+=("data.train_files=$(ebpo_yaml_list "$EBPO_TRAIN_FILES")")
    [[ -n ${EBPO_EVAL_FILES:-} ]] && overrides+=("data.eval_files=$(ebpo_yaml_list "$EBPO_EVAL_FILES")")
    overrides+=(${user_overrides[@]+"${user_overrides[@]}"})

    local cpus_per_task=${SLURM_CPUS_PER_TASK:-${EBPO_DEFAULT_CPUS_PER_TASK:-8}}
    local -a srun_cmd=(
        srun --nodes="$nnodes" --ntasks-per-node="$gpus" --cpus-per-task="$cpus_per_task"
        --kill-on-bad-exit=1 --output="$log_dir/rank%3t.log"
        "$python" -u -m ebpo_megatron.train --config "$config" "${overrides[@]}"
    )

    echo "== ebpo launch$( ((dry_run)) && echo ' (dry run: nothing is started)') =="
    echo "job          $job_name (id $job_id, restart $restart)"
    echo "nodes        $nnodes x $gpus GPUs = $world ranks ($nodelist)"
    echo "rendezvous   MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT (ranks: SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID)"
    echo "config       $config"
    echo "overrides    ${overrides[*]}"
    echo "run dir      $run_root/$run_name (resumes from its latest checkpoint)"
    echo "log dir      $log_dir"
    echo "command      ${srun_cmd[*]}"
    echo "== ebpo-plan =="

    # ---------------------------------------------------------------- plan check (both modes)
    local plan_rc=0
    PYTHONPATH="${EBPO_ROOT}${PYTHONPATH:+:$PYTHONPATH}" "$python" -m ebpo_megatron.planner \
        --config "$config" --nodes "$nnodes" --gpus-per-node "$gpus" "${overrides[@]}" || plan_rc=$?
    if ((dry_run)); then
        return "$plan_rc"
    fi
    if ((plan_rc == 3)) && [[ ${EBPO_IGNORE_PLAN:-0} == 1 ]]; then
        ebpo_log "the planner says the plan does not fit; EBPO_IGNORE_PLAN=1: launching anyway"
    elif ((plan_rc != 0)); then
        ebpo_die "the planner rejected this layout (exit $plan_rc); see above (EBPO_IGNORE_PLAN=1 overrides a memory verdict)"
    fi

    # ---------------------------------------------------------------- launch
    [[ -n ${SLURM_JOB_ID:-} ]] || ebpo_die "not inside a Slurm job: submit with sbatch, or use --dry-run"
    mkdir -p "$log_dir" "$run_root"
    ebpo_export_env
    {
        echo "# $(date) job $job_id restart $restart on $nodelist"
        env | grep -E '^(SLURM_|NCCL_|CUDA_|MASTER_|TORCH_|OMP_)' | sort
    } >"$log_dir/launch_env.txt"

    EBPO_STOP_REQUESTED=0
    EBPO_SRUN_PID=""
    trap ebpo_on_usr1 USR1
    ebpo_log "starting ${world} ranks; logs: $log_dir/rank*.log"
    "${srun_cmd[@]}" &
    EBPO_SRUN_PID=$!
    ((EBPO_STOP_REQUESTED == 0)) || kill -USR1 "$EBPO_SRUN_PID" 2>/dev/null || true  # signal came before $! was set

    # `wait` returns early (status > 128) whenever a trapped signal arrives: keep waiting until
    # srun itself is gone, then collect its exit status.
    local rc=0
    while :; do
        rc=0
        wait "$EBPO_SRUN_PID" || rc=$?
        kill -0 "$EBPO_SRUN_PID" 2>/dev/null || break
    done
    if ((rc > 128)); then  # srun ended right after the trap: fetch its real status
        local again=0
        wait "$EBPO_SRUN_PID" 2>/dev/null || again=$?
        ((again == 127)) || rc=$again
    fi
    trap - USR1
    ebpo_log "srun exited with status $rc"

    if ((EBPO_STOP_REQUESTED)); then
        local max=${EBPO_MAX_RESTARTS:-50}
        if ((restart >= max)); then
            ebpo_log "restart $restart >= EBPO_MAX_RESTARTS=$max: not requeueing"
        elif ((rc != 0)); then
            ebpo_log "stopped on SIGUSR1 but srun failed ($rc): requeueing anyway, the next start resumes from the last complete checkpoint"
            scontrol requeue "$SLURM_JOB_ID"
        else
            ebpo_log "checkpoint saved on SIGUSR1: requeueing job $SLURM_JOB_ID (run dir $run_root/$run_name)"
            scontrol requeue "$SLURM_JOB_ID"
        fi
    fi
    return "$rc"
}

# SIGUSR1 from Slurm (--signal=B:USR1@<seconds>): forward it to the srun step, which delivers it
# to every task. (Equivalent: scancel --signal=USR1 "$SLURM_JOB_ID.<step>".)
ebpo_on_usr1() {
    EBPO_STOP_REQUESTED=1
    ebpo_log "SIGUSR1: the time limit is near; asking the trainer to checkpoint and stop"
    if [[ -n ${EBPO_SRUN_PID:-} ]] && kill -0 "$EBPO_SRUN_PID" 2>/dev/null; then
        kill -USR1 "$EBPO_SRUN_PID" 2>/dev/null || true
    fi
}
