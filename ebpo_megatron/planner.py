"""``ebpo-plan``: parameter count, memory per GPU, FLOPs and step time of an EBPO run at scale.

    ebpo-plan --config FILE --nodes N --gpus-per-node 8 [--mfu 0.4] [--peak-tflops 989] [key=value ...]
    python -m ebpo_megatron.planner ...            (the same, before the console script is installed)

The core (:class:`PlanInputs` -> :func:`make_plan`) works on plain numbers and imports nothing
from the trainer, so it runs anywhere (no torch, no GPU). :func:`plan_inputs_from_config` is the
thin adapter from the trainer's typed config (``config.schema.Config``). Every formula is listed,
with its source and its assumptions, in ``docs/planner.md``.

Units: counts are exact integers; bytes are exact; printed memory is GiB (2^30 bytes) and FLOPs
are decimal (1 PFLOP = 1e15). Exit status of the CLI: 0 the plan fits, 2 the config or the
layout is impossible (nothing printed but the reason), 3 the layout is valid but the memory per
GPU or the KV cache does not fit (the full table is printed first).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

GiB = 1024**3
MiB = 1024**2

# H100 SXM 80GB: dense BF16 tensor-core peak (989.4 TFLOP/s), HBM3 bandwidth, and the memory
# that CUDA reports as total (torch.cuda.get_device_properties(0).total_memory ~ 79.1 GiB; vLLM's
# gpu_memory_utilization is a fraction of this number).
H100_PEAK_TFLOPS = 989.0
H100_HBM_TBPS = 3.35
H100_MEMORY_GIB = 79.1


class PlanError(ValueError):
    """The layout or the workload is impossible; the message names the numbers and the rule."""


# ------------------------------------------------------------------------------------ inputs
@dataclass(frozen=True)
class PlanInputs:
    """Everything the planner needs, as plain numbers (no trainer imports)."""

    # model (ModelConfig)
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_kv_heads: int
    vocab_size: int
    head_dim: int | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    max_position_embeddings: int | None = None
    precision: str = "bf16"  # fp32 | bf16 | fp8
    recompute: str = "none"  # none | selective | full
    flash_attention: bool = False  # fused attention (TE): the s x s scores are never stored
    # parallel (ParallelConfig)
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    virtual_pipeline: int | None = None
    sequence_parallel: bool = False
    vocab_multiple: int = 128
    # cluster
    nodes: int = 1
    gpus_per_node: int = 8
    gpu_memory_gib: float = H100_MEMORY_GIB
    peak_tflops: float = H100_PEAK_TFLOPS  # per GPU, dense
    mfu: float = 0.4  # achieved fraction of peak on the FLOPs actually executed (train side)
    rollout_mfu: float | None = None  # compute-bound part of generation; None: same as mfu
    hbm_tbps: float = H100_HBM_TBPS
    reserve_gib: float = 3.0  # CUDA context, NCCL buffers, allocator fragmentation
    # workload (data, rollout, train.step, algorithm.loss)
    prompts_per_step: int = 16  # M, over all DP ranks
    group_size: int = 4  # G = rollout.n
    max_prompt_tokens: int = 256
    max_new_tokens: int = 32
    mean_prompt_tokens: float | None = None  # for FLOPs/time; None: the maximum
    mean_response_tokens: float | None = None  # for FLOPs/time; None: the maximum
    ppo_epochs: int = 1
    mini_batches: int = 1
    old_logp: str = "recompute"  # train.step.old_logp: "rollout" takes π_old from the engine
    micro_batch_size: int | None = 1
    max_tokens_per_microbatch: int | None = None
    use_distributed_optimizer: bool = True
    kl_coef: float = 0.001  # > 0: a frozen reference model is resident
    step_kl: bool = True  # one more forward pass after the updates (KL(pi_t || pi_t+1))
    # rollout engine
    rollout_engine: str = "vllm"  # vllm | native
    vllm_tensor_parallel: int = 1
    gpu_memory_utilization: float = 0.5
    sync_bucket_mb: float = 512.0
    max_num_seqs: int = 256  # concurrent sequences per engine (vLLM max_num_seqs / rollout.max_batch_size)

    def __post_init__(self) -> None:
        if self.recompute is None:  # accept None for "no recompute"
            object.__setattr__(self, "recompute", "none")

    # derived shapes
    @property
    def kv_channels(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def seq_len(self) -> int:
        return self.max_prompt_tokens + self.max_new_tokens

    @property
    def padded_vocab(self) -> int:
        """Vocabulary rounded up to a multiple of lcm(vocab_multiple, TP) (parallel.padded_vocab_size)."""
        step = math.lcm(self.vocab_multiple, self.tensor_parallel)
        return -(-self.vocab_size // step) * step

    @property
    def weight_bytes(self) -> int:
        return 4 if self.precision == "fp32" else 2

    @property
    def old_logp_pass(self) -> bool:
        """π_old needs a forward pass of its own: recomputed (``train.step.old_logp``) and the step
        not on-policy (``config.training.StepConfig.on_policy``: one epoch, one mini-batch, where
        the update's own forward gives it)."""
        return self.old_logp == "recompute" and not (self.ppo_epochs == 1 and self.mini_batches == 1)


# ------------------------------------------------------------------------------ parameters
@dataclass(frozen=True)
class ParamCounts:
    """Parameters of the whole model (vocabulary as given, i.e. the Hugging Face count)."""

    embedding: int
    q: int
    kv: int
    o: int
    qkv_bias: int
    qk_norm: int
    mlp: int
    layer_norms: int
    final_norm: int
    output: int  # 0 when tied
    num_layers: int

    @property
    def attention(self) -> int:
        return self.q + self.kv + self.o + self.qkv_bias + self.qk_norm

    @property
    def per_layer(self) -> int:
        return self.attention + self.mlp + self.layer_norms

    @property
    def layers(self) -> int:
        return self.per_layer * self.num_layers

    @property
    def total(self) -> int:
        return self.embedding + self.layers + self.final_norm + self.output

    @property
    def matmul(self) -> int:
        """Parameters that take part in a matrix multiply per token (FLOPs' N): every linear
        weight of the layers and the output layer (the tied embedding when tied); the input
        embedding lookup, biases and norms are not counted."""
        return self.num_layers * (self.q + self.kv + self.o + self.mlp) + self.embedding


def count_parameters(inp: PlanInputs, vocab: int | None = None) -> ParamCounts:
    """Llama / Qwen2 / Qwen3 decoder: GQA attention (q: h x a*d, k and v: h x kv*d each, o: a*d x h,
    optional q/k/v bias, optional QK-norm weights of size d each), SwiGLU MLP (gate, up: h x f,
    down: f x h), two RMSNorm weights per layer, a final RMSNorm, embedding V x h and an output
    layer V x h unless tied."""
    h, f, d = inp.hidden_size, inp.ffn_hidden_size, inp.kv_channels
    a, kv = inp.num_attention_heads, inp.num_kv_heads
    v = inp.vocab_size if vocab is None else vocab
    return ParamCounts(
        embedding=v * h,
        q=h * a * d,
        kv=2 * h * kv * d,
        o=a * d * h,
        qkv_bias=(a + 2 * kv) * d if inp.qkv_bias else 0,
        qk_norm=2 * d if inp.qk_norm else 0,
        mlp=3 * h * f,
        layer_norms=2 * h,
        final_norm=h,
        output=0 if inp.tie_word_embeddings else v * h,
        num_layers=inp.num_layers,
    )


@dataclass(frozen=True)
class RankParams:
    """Parameters held by one GPU of pipeline stage ``stage`` (Megatron's padded vocabulary)."""

    stage: int
    layers: int  # transformer layers on this stage
    layer_params: int  # all of this rank's layer parameters
    embedding: int
    head: int  # final norm + output layer (or the tied copy on the last stage when PP > 1)
    linear: int  # weights of the TE linear layers (the FP8 GEMMs): q, k, v, o, MLP

    @property
    def total(self) -> int:
        return self.layer_params + self.embedding + self.head


def rank_params(inp: PlanInputs, stage: int) -> RankParams:
    """TP splits every linear weight (and the vocabulary of embedding/output, and the QKV bias);
    RMSNorm and QK-norm weights are replicated on each TP rank. PP gives each stage L/PP
    layers; the embedding lives on the first stage, the final norm and the output layer on the
    last. With tied embeddings and PP > 1, Megatron keeps a second copy of the embedding on the
    last stage for the output layer (its gradient is all-reduced with the first stage's)."""
    tp, pp = inp.tensor_parallel, inp.pipeline_parallel
    c = count_parameters(inp, vocab=inp.padded_vocab)
    layers = inp.num_layers // pp
    split = c.q + c.kv + c.o + c.qkv_bias + c.mlp
    replicated = c.qk_norm + c.layer_norms
    vocab_rows = inp.padded_vocab * inp.hidden_size // tp
    first, last = stage == 0, stage == pp - 1
    head = 0
    if last:
        head = c.final_norm + (vocab_rows if (not inp.tie_word_embeddings or pp > 1) else 0)
    return RankParams(
        stage=stage,
        layers=layers,
        layer_params=layers * (split // tp + replicated),
        embedding=vocab_rows if first else 0,
        head=head,
        linear=layers * (c.q + c.kv + c.o + c.mlp) // tp,
    )


# ------------------------------------------------------------------------------ activations
def micro_batch_tokens(inp: PlanInputs) -> int:
    """Tokens b*s of the largest micro-batch: micro_batch_size x the longest sequence, or the
    token budget of dynamic batching (a single sequence longer than the budget gets its own)."""
    if inp.micro_batch_size is not None:
        return inp.micro_batch_size * inp.seq_len
    return max(int(inp.max_tokens_per_microbatch), inp.seq_len)


def layer_activation_bytes(inp: PlanInputs, recompute: str | None = None) -> float:
    """Bytes one transformer layer keeps for backward, for one micro-batch (Korthikanti et al.
    2022, "Reducing Activation Recomputation in Large Transformer Models", eqs. 1-2, Table 2):

        none       s*b*h*(34 + 5*a*s/h)            (t = 1)
                   s*b*h*(10 + 24/t + 5*a*s/(h*t))  (TP t, no sequence parallelism)
                   s*b*h*(34/t + 5*a*s/(h*t))        (TP t with sequence parallelism)
        selective  the same without the 5*a*s/h attention-score term
        full       2*s*b*h (the layer input only), /t with sequence parallelism

    With fused (flash) attention the s x s scores are never stored, so the 5*a*s/h term is
    dropped for every mode. 16-bit activations; doubled for fp32 training.
    """
    mode = inp.recompute if recompute is None else recompute
    sb = micro_batch_tokens(inp)
    s, h, a, t = inp.seq_len, inp.hidden_size, inp.num_attention_heads, inp.tensor_parallel
    sp = inp.sequence_parallel and t > 1
    scores = 0.0 if inp.flash_attention else 5.0 * a * s / (h * t)
    if mode == "full":
        per = 2.0 / t if sp else 2.0
    elif mode == "selective":
        per = 34.0 / t if sp else 10.0 + 24.0 / t
    elif mode == "none":
        per = (34.0 / t if sp else 10.0 + 24.0 / t) + scores
    else:
        raise PlanError(f"model.recompute: expected none, selective or full, got {mode!r}")
    scale = 2.0 if inp.precision == "fp32" else 1.0
    return sb * h * per * scale


def recompute_working_bytes(inp: PlanInputs) -> float:
    """Transient of the recomputation in backward: with ``full`` one layer's activations (no
    recompute) for one micro-batch; with ``selective`` one layer's attention scores (0 with
    flash attention); 0 without recomputation."""
    if inp.recompute == "full":
        return layer_activation_bytes(inp, "none")
    if inp.recompute == "selective":
        return layer_activation_bytes(inp, "none") - layer_activation_bytes(inp, "selective")
    return 0.0


def microbatches_per_rank(inp: PlanInputs) -> int:
    """Micro-batches of one mini-batch on the busiest DP rank (dynamic batching: assumes every
    sequence has the maximum length, the fewest rows per micro-batch)."""
    rows = math.ceil(math.ceil(inp.prompts_per_step / data_parallel(inp)) * inp.group_size / inp.mini_batches)
    if inp.micro_batch_size is not None:
        return math.ceil(rows / inp.micro_batch_size)
    per_mb = max(1, int(inp.max_tokens_per_microbatch) // inp.seq_len)
    return math.ceil(rows / per_mb)


def inflight_layers(inp: PlanInputs, stage: int) -> float:
    """Layers' worth of stored activations on pipeline stage ``stage`` at the peak of 1F1B.

    1F1B: stage i holds min(PP - i, m) micro-batches of its L/PP layers (PP on the first stage).
    Interleaved (v virtual stages): stage i holds min(2*(PP-i-1) + (v-1)*PP + 1, m*v) model chunks
    of L/(PP*v) layers each; on the first stage that is L*(1 + (PP-1)/(PP*v)) layers.
    """
    pp, m = inp.pipeline_parallel, microbatches_per_rank(inp)
    if pp == 1:
        return float(inp.num_layers)  # forward then backward, one micro-batch at a time
    v = inp.virtual_pipeline or 1
    if v == 1:
        return min(pp - stage, m) * inp.num_layers / pp
    chunks = min(2 * (pp - stage - 1) + (v - 1) * pp + 1, m * v)
    return chunks * inp.num_layers / (pp * v)


def logits_bytes(inp: PlanInputs) -> float:
    """Last stage, one micro-batch: bf16 logits (2 B) plus three fp32 tensors of the
    vocabulary-parallel log-prob/entropy (upcast x, exp(x - max) kept for backward, the entropy's
    probabilities): 14 bytes per token per vocabulary entry of this TP rank."""
    per = 14 if inp.precision != "fp32" else 16
    return float(micro_batch_tokens(inp) * (inp.padded_vocab // inp.tensor_parallel) * per)


# ---------------------------------------------------------------------------------- layout
def data_parallel(inp: PlanInputs) -> int:
    return inp.world_size // (inp.tensor_parallel * inp.pipeline_parallel)


def validate(inp: PlanInputs) -> None:
    """Raise :class:`PlanError` for a layout or workload that cannot run; the rules are those of
    ``parallel.distributed.validate_layout``, Megatron, the trainer's batching and vLLM."""
    tp, pp, world = inp.tensor_parallel, inp.pipeline_parallel, inp.world_size
    if inp.nodes < 1 or inp.gpus_per_node < 1:
        raise PlanError(f"nodes ({inp.nodes}) and gpus-per-node ({inp.gpus_per_node}) must be >= 1")
    if tp < 1 or pp < 1:
        raise PlanError(f"tensor_parallel ({tp}) and pipeline_parallel ({pp}) must be >= 1")
    if world % (tp * pp):
        raise PlanError(
            f"world size {world} ({inp.nodes} nodes x {inp.gpus_per_node} GPUs) is not divisible by "
            f"tensor_parallel x pipeline_parallel = {tp} x {pp} = {tp * pp}")
    if inp.num_attention_heads % inp.num_kv_heads:
        raise PlanError(f"num_attention_heads {inp.num_attention_heads} is not a multiple of "
                        f"num_kv_heads {inp.num_kv_heads}")
    if inp.head_dim is None and inp.hidden_size % inp.num_attention_heads:
        raise PlanError(f"hidden_size {inp.hidden_size} is not divisible by num_attention_heads "
                        f"{inp.num_attention_heads}; set head_dim")
    if inp.num_attention_heads % tp:
        raise PlanError(f"num_attention_heads {inp.num_attention_heads} is not divisible by tensor_parallel {tp}")
    if inp.num_kv_heads % tp:
        raise PlanError(f"num_kv_heads {inp.num_kv_heads} is not divisible by tensor_parallel {tp}")
    if inp.ffn_hidden_size % tp:
        raise PlanError(f"ffn_hidden_size {inp.ffn_hidden_size} is not divisible by tensor_parallel {tp}")
    stages = pp * (inp.virtual_pipeline or 1)
    if inp.num_layers % stages:
        raise PlanError(f"num_layers {inp.num_layers} is not divisible by pipeline_parallel x "
                        f"virtual_pipeline = {stages}")
    if inp.virtual_pipeline is not None and (inp.virtual_pipeline < 2 or pp < 2):
        raise PlanError(f"virtual_pipeline {inp.virtual_pipeline}: needs pipeline_parallel >= 2 and a value >= 2")
    if inp.sequence_parallel and tp == 1:
        raise PlanError("sequence_parallel needs tensor_parallel > 1")
    if inp.precision not in ("fp32", "bf16", "fp8"):
        raise PlanError(f"precision: expected fp32, bf16 or fp8, got {inp.precision!r}")
    if inp.max_position_embeddings is not None and inp.seq_len > inp.max_position_embeddings:
        raise PlanError(f"max_prompt_tokens + max_new_tokens = {inp.seq_len} exceeds "
                        f"max_position_embeddings {inp.max_position_embeddings}")
    if (inp.micro_batch_size is None) == (inp.max_tokens_per_microbatch is None):
        raise PlanError("give exactly one of train.step.micro_batch_size and max_tokens_per_microbatch")
    dp = world // (tp * pp)
    per_rank = math.ceil(inp.prompts_per_step / dp)
    if (dp - 1) * per_rank >= inp.prompts_per_step:
        raise PlanError(f"data.prompts_per_step {inp.prompts_per_step} leaves data-parallel ranks without "
                        f"prompts at DP = {dp} (each of the first ranks takes {per_rank}); use a multiple of {dp}")
    smallest = (inp.prompts_per_step - (dp - 1) * per_rank) * inp.group_size
    if not 1 <= inp.mini_batches <= smallest:
        raise PlanError(f"train.step.mini_batches {inp.mini_batches}: a DP rank holds only {smallest} "
                        f"responses per step ({inp.prompts_per_step} prompts x G={inp.group_size} over DP={dp})")
    if inp.rollout_engine == "vllm":
        vtp = inp.vllm_tensor_parallel
        if vtp < 1 or world % vtp:
            raise PlanError(f"rollout.vllm.tensor_parallel {vtp} does not divide the world size {world}")
        if inp.num_attention_heads % vtp:
            raise PlanError(f"num_attention_heads {inp.num_attention_heads} is not divisible by "
                            f"rollout.vllm.tensor_parallel {vtp}")
        if inp.num_kv_heads % vtp and vtp % inp.num_kv_heads:
            raise PlanError(f"rollout.vllm.tensor_parallel {vtp} neither divides nor is a multiple of "
                            f"num_kv_heads {inp.num_kv_heads} (vLLM splits or replicates KV heads)")
        if not 0 < inp.gpu_memory_utilization <= 1:
            raise PlanError(f"rollout.vllm.gpu_memory_utilization: expected in (0, 1], got {inp.gpu_memory_utilization}")
    elif inp.rollout_engine != "native":
        raise PlanError(f"rollout.engine: expected vllm or native, got {inp.rollout_engine!r}")
    if not 0 < inp.mfu <= 1 or (inp.rollout_mfu is not None and not 0 < inp.rollout_mfu <= 1):
        raise PlanError(f"mfu: expected in (0, 1], got {inp.mfu} / {inp.rollout_mfu}")


# ---------------------------------------------------------------------------------- memory
@dataclass(frozen=True)
class StageMemory:
    """Bytes on one GPU of a pipeline stage; ``train`` and ``generate`` are the two phases' peaks."""

    stage: int
    params: int
    weights: float
    grads: float
    optimizer: float
    fp8_cache: float
    reference: float
    reserve: float
    activations: float
    recompute_working: float
    logits: float
    rollout: float  # vLLM's whole budget (weights + KV cache), or the native engine's KV cache
    sync_transient: float

    @property
    def resident(self) -> float:
        """Held in both phases: model, gradients, optimizer, FP8 cache, reference, reserve."""
        return self.weights + self.grads + self.optimizer + self.fp8_cache + self.reference + self.reserve

    @property
    def train(self) -> float:
        return self.resident + self.activations + self.recompute_working + self.logits

    @property
    def generate(self) -> float:
        return self.resident + self.rollout + self.sync_transient

    @property
    def peak(self) -> float:
        return max(self.train, self.generate)


@dataclass(frozen=True)
class RolloutPlan:
    engines: int
    tensor_parallel: int
    budget_bytes: float  # gpu_memory_utilization x GPU memory (vLLM); native: the KV cache
    weight_bytes: float  # per GPU
    kv_bytes: float  # KV-cache budget per GPU
    kv_bytes_per_token: float  # per GPU (the whole model: x tensor_parallel, or kv replicated)
    kv_bytes_per_token_model: int  # 2 * layers * kv_heads * head_dim * 2 bytes (whole model)
    kv_tokens: int  # tokens one engine can hold
    concurrent_sequences: int  # of full length, per engine, capped by max_num_seqs
    sequences_per_engine: int
    waves: int


def rollout_plan(inp: PlanInputs) -> RolloutPlan:
    """vLLM colocated: weights at vLLM's TP (bf16: the trainer exports bf16 HF tensors, norms
    replicated), KV budget = gpu_memory_utilization x GPU memory - weights, KV bytes per token =
    2 (k, v) x layers x kv_heads x head_dim x 2 bytes, split over vLLM's TP (replicated when TP >
    kv_heads). The step's M*G sequences are assumed spread over all world/TP_vllm engines.
    Native engine: the trainer's own model (TP x PP) with a KV cache for max_num_seqs rows."""
    c = count_parameters(inp)
    L, kv, d = inp.num_layers, inp.num_kv_heads, inp.kv_channels
    per_token_model = 2 * L * kv * d * 2
    seqs = inp.prompts_per_step * inp.group_size
    gpu = inp.gpu_memory_gib * GiB
    if inp.rollout_engine == "vllm":
        vtp = inp.vllm_tensor_parallel
        split = c.embedding + c.output + L * (c.q + c.kv + c.o + c.qkv_bias + c.mlp)
        replicated = L * (c.layer_norms + c.qk_norm) + c.final_norm
        weights = (split / vtp + replicated) * 2.0
        budget = inp.gpu_memory_utilization * gpu
        kv_heads_rank = max(kv // vtp, 1)
        per_token = 2 * L * kv_heads_rank * d * 2
        kv_bytes = budget - weights
        engines = inp.world_size // vtp
        tp_used = vtp
    else:  # the native engine decodes on the trainer's layout: each DP rank's model-parallel group is one engine
        tp_used = inp.tensor_parallel
        engines = data_parallel(inp)
        per_token = 2 * (L // inp.pipeline_parallel) * (kv // inp.tensor_parallel) * d * inp.weight_bytes
        per_token_model = 2 * L * kv * d * inp.weight_bytes
        per_seq_rows = min(inp.max_num_seqs, math.ceil(seqs / engines))
        kv_bytes = float(per_token * per_seq_rows * inp.seq_len)
        budget, weights = kv_bytes, 0.0
    kv_tokens = int(max(kv_bytes, 0) // per_token)
    concurrent = min(kv_tokens // inp.seq_len, inp.max_num_seqs)
    per_engine = math.ceil(seqs / engines)
    waves = math.ceil(per_engine / concurrent) if concurrent > 0 else 0
    return RolloutPlan(engines, tp_used, budget, weights, kv_bytes, per_token, per_token_model,
                       kv_tokens, concurrent, per_engine, waves)


def stage_memory(inp: PlanInputs, stage: int, rollout: RolloutPlan | None = None) -> StageMemory:
    """Bytes per GPU on ``stage`` (formulas: docs/planner.md, "Memory")."""
    rp = rank_params(inp, stage)
    n = rp.total
    dp = data_parallel(inp)
    wb = inp.weight_bytes
    # Adam: fp32 main params (a separate copy unless the model itself is fp32) + m + v
    opt_per_param = 8 if inp.precision == "fp32" else 12
    optimizer = n * opt_per_param / (dp if inp.use_distributed_optimizer else 1)
    fp8 = inp.precision == "fp8"
    has_ref = inp.kl_coef > 0
    rollout = rollout or rollout_plan(inp)
    c = count_parameters(inp)
    largest = max(inp.vocab_size * inp.hidden_size, c.q, c.o, inp.ffn_hidden_size * inp.hidden_size) * 2
    sync = max(inp.sync_bucket_mb * MiB, largest) if inp.rollout_engine == "vllm" else 0.0
    last = stage == inp.pipeline_parallel - 1
    return StageMemory(
        stage=stage,
        params=n,
        weights=float(n * wb),
        grads=float(n * 4),  # Megatron DDP grad buffer, grad_reduce_in_fp32=True
        optimizer=float(optimizer),
        fp8_cache=float(2 * rp.linear) if fp8 else 0.0,  # TE's cached FP8 weight + transpose
        reference=float(n * wb + (rp.linear if fp8 else 0)) if has_ref else 0.0,
        reserve=inp.reserve_gib * GiB,
        activations=inflight_layers(inp, stage) * layer_activation_bytes(inp),
        recompute_working=recompute_working_bytes(inp),
        logits=logits_bytes(inp) if last else 0.0,
        rollout=rollout.budget_bytes,
        sync_transient=float(sync),
    )


# ----------------------------------------------------------------------------------- FLOPs
@dataclass(frozen=True)
class FlopsPlan:
    train_tokens: float  # tokens of the step's M*G sequences (prompt + response)
    generated_tokens: float
    train: float  # model FLOPs of the updates (6N + attention), x ppo_epochs
    recompute: float  # extra executed FLOPs of recomputation
    logprob_passes: int
    logprob: float  # old (+ reference) (+ step-KL) forward passes
    rollout: float  # prefill + decode
    train_seconds: float
    rollout_compute_seconds: float
    rollout_memory_seconds: float

    @property
    def total(self) -> float:
        return self.train + self.recompute + self.logprob + self.rollout

    @property
    def model_flops(self) -> float:
        return self.train + self.logprob + self.rollout

    @property
    def rollout_seconds(self) -> float:
        return max(self.rollout_compute_seconds, self.rollout_memory_seconds)

    @property
    def step_seconds(self) -> float:
        return self.train_seconds + self.rollout_seconds


def flops_plan(inp: PlanInputs, rollout: RolloutPlan | None = None) -> FlopsPlan:
    """FLOPs of one RL step (docs/planner.md, "FLOPs and time")."""
    c = count_parameters(inp, vocab=inp.padded_vocab)
    n = c.matmul
    attn = 4.0 * inp.num_layers * inp.num_attention_heads * inp.kv_channels  # x context, per token, forward
    p = inp.max_prompt_tokens if inp.mean_prompt_tokens is None else inp.mean_prompt_tokens
    r = inp.max_new_tokens if inp.mean_response_tokens is None else inp.mean_response_tokens
    seqs = inp.prompts_per_step * inp.group_size
    s = p + r
    tokens = seqs * s
    forward = (2.0 * n + attn * s) * tokens
    train = inp.ppo_epochs * 3.0 * forward
    recompute = {"none": 0.0, "selective": attn * s * tokens, "full": forward}[inp.recompute] * inp.ppo_epochs
    passes = inp.old_logp_pass + (inp.kl_coef > 0) + bool(inp.step_kl)
    logprob = passes * forward
    prefill_tokens = inp.prompts_per_step * p  # the G samples of a prompt share its prefill
    generated = seqs * r
    rollout_flops = 2.0 * n * (prefill_tokens + generated) + attn * (prefill_tokens * p + generated * (p + r / 2))
    cluster = inp.world_size * inp.peak_tflops * 1e12
    train_seconds = (train + recompute + logprob) / (cluster * inp.mfu)
    rollout_compute = rollout_flops / (cluster * (inp.rollout_mfu or inp.mfu))
    rp = rollout or rollout_plan(inp)
    memory_seconds = 0.0
    if rp.concurrent_sequences > 0:
        # decode is bandwidth-bound: every step reads this GPU's weights and the KV of the
        # sequences in flight (on average prompt + half the response each)
        active = min(rp.concurrent_sequences, rp.sequences_per_engine)
        per_step = rp.weight_bytes + active * (p + r / 2) * rp.kv_bytes_per_token
        if inp.rollout_engine == "native":
            per_step = rank_params(inp, 0).total * inp.weight_bytes + active * (p + r / 2) * rp.kv_bytes_per_token
        memory_seconds = rp.waves * r * per_step / (inp.hbm_tbps * 1e12)
    return FlopsPlan(tokens, generated, train, recompute, passes, logprob, rollout_flops,
                     train_seconds, rollout_compute, memory_seconds)


# ------------------------------------------------------------------------------------ plan
@dataclass
class Plan:
    inputs: PlanInputs
    params: ParamCounts
    world_size: int
    data_parallel: int
    microbatches: int
    bubble: float
    stages: list[StageMemory]
    rollout: RolloutPlan
    flops: FlopsPlan
    problems: list[str] = field(default_factory=list)  # memory or KV cache does not fit
    notes: list[str] = field(default_factory=list)

    @property
    def peak_stage(self) -> StageMemory:
        return max(self.stages, key=lambda m: m.peak)

    @property
    def peak_bytes(self) -> float:
        return self.peak_stage.peak

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GiB

    @property
    def fits(self) -> bool:
        return not self.problems

    def summary(self) -> dict[str, Any]:
        i = self.inputs
        peak = self.peak_stage
        return {
            "world": self.world_size, "tp": i.tensor_parallel, "pp": i.pipeline_parallel,
            "dp": self.data_parallel, "vllm_tp": self.rollout.tensor_parallel,
            "params": self.params.total, "peak_gib": round(self.peak_gib, 2),
            "train_gib": round(max(m.train for m in self.stages) / GiB, 2),
            "generate_gib": round(max(m.generate for m in self.stages) / GiB, 2),
            "peak_stage": peak.stage, "gpu_gib": i.gpu_memory_gib,
            "kv_tokens": self.rollout.kv_tokens, "step_s": round(self.flops.step_seconds, 1),
            "fits": self.fits,
        }

    def to_dict(self) -> dict[str, Any]:
        def stage(m: StageMemory) -> dict[str, Any]:
            return {**asdict(m), "resident": m.resident, "train": m.train, "generate": m.generate, "peak": m.peak}

        return {
            "summary": self.summary(),
            "inputs": asdict(self.inputs),
            "params": {**asdict(self.params), "per_layer": self.params.per_layer, "total": self.params.total,
                       "matmul": self.params.matmul},
            "rank_params": [asdict(rank_params(self.inputs, m.stage)) for m in self.stages],
            "microbatches": self.microbatches, "bubble": self.bubble,
            "memory": [stage(m) for m in self.stages],
            "rollout": asdict(self.rollout),
            "flops": {**asdict(self.flops), "total": self.flops.total, "step_seconds": self.flops.step_seconds,
                      "rollout_seconds": self.flops.rollout_seconds},
            "problems": self.problems, "notes": self.notes,
        }


def make_plan(inp: PlanInputs) -> Plan:
    """Validate ``inp`` (PlanError when impossible) and compute the whole plan."""
    validate(inp)
    dp = data_parallel(inp)
    rp = rollout_plan(inp)
    stages = [stage_memory(inp, s, rp) for s in range(inp.pipeline_parallel)]
    m = microbatches_per_rank(inp)
    pp, v = inp.pipeline_parallel, inp.virtual_pipeline or 1
    bubble = (pp - 1) / (v * m + pp - 1) if pp > 1 else 0.0
    plan = Plan(inp, count_parameters(inp), inp.world_size, dp, m, bubble, stages, rp, flops_plan(inp, rp))
    gpu = inp.gpu_memory_gib * GiB
    worst = plan.peak_stage
    if worst.peak > gpu:
        phase = "train" if worst.train >= worst.generate else "generate"
        plan.problems.append(f"peak memory {worst.peak / GiB:.2f} GiB (stage {worst.stage}, {phase} phase) "
                             f"exceeds the GPU's {inp.gpu_memory_gib:.2f} GiB")
    if inp.rollout_engine == "vllm":
        if rp.kv_bytes <= 0:
            plan.problems.append(
                f"vLLM KV cache budget is {rp.kv_bytes / GiB:.2f} GiB: gpu_memory_utilization "
                f"{inp.gpu_memory_utilization} x {inp.gpu_memory_gib} GiB does not cover vLLM's weights "
                f"({rp.weight_bytes / GiB:.2f} GiB at TP {rp.tensor_parallel})")
        elif rp.kv_tokens < inp.seq_len:
            plan.problems.append(f"vLLM KV cache holds {rp.kv_tokens} tokens, fewer than one sequence of "
                                 f"{inp.seq_len} (max_prompt_tokens + max_new_tokens)")
        if inp.tensor_parallel * inp.pipeline_parallel > inp.vllm_tensor_parallel:
            plan.notes.append(
                f"{inp.tensor_parallel * inp.pipeline_parallel // inp.vllm_tensor_parallel} vLLM engines per "
                "model-parallel group: the rollout wiring must give them different prompts "
                "(the estimate assumes the step's prompts spread over all engines)")
    if inp.rollout_engine == "vllm" and inp.vllm_tensor_parallel > inp.gpus_per_node:
        plan.notes.append(f"rollout.vllm.tensor_parallel {inp.vllm_tensor_parallel} spans nodes: every decoded "
                          "token then waits on inter-node all-reduces")
    if inp.tensor_parallel > inp.gpus_per_node:
        plan.notes.append(f"tensor_parallel {inp.tensor_parallel} spans nodes ({inp.gpus_per_node} GPUs each): "
                          "TP all-reduces then cross the network")
    if inp.pipeline_parallel > 1 and m < 4 * inp.pipeline_parallel:
        plan.notes.append(f"only {m} micro-batches per mini-batch for PP {inp.pipeline_parallel}: "
                          f"pipeline bubble {bubble:.0%}")
    return plan


# ---------------------------------------------------------------------------------- adapter
def plan_inputs_from_config(config: Any, *, nodes: int, gpus_per_node: int, **cluster: Any) -> PlanInputs:
    """PlanInputs from the trainer's ``config.schema.Config`` (duck-typed: only attributes are
    read) plus the cluster (nodes, GPUs per node, and optional PlanInputs fields such as mfu,
    peak_tflops, gpu_memory_gib)."""
    m, par = config.model, config.parallel
    step, loss = config.train.step, config.algorithm.loss
    roll, data = config.rollout, config.data
    vllm = roll.vllm
    impl = getattr(m, "transformer_impl", "local")
    recompute = getattr(m, "recompute", None) or "none"
    values = dict(
        num_layers=m.num_layers, hidden_size=m.hidden_size, ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads, num_kv_heads=m.num_kv_heads,
        vocab_size=m.vocab_size, head_dim=getattr(m, "head_dim", None),
        tie_word_embeddings=bool(getattr(m, "tie_word_embeddings", False)),
        qkv_bias=bool(getattr(m, "qkv_bias", False)), qk_norm=bool(getattr(m, "qk_norm", False)),
        max_position_embeddings=getattr(m, "max_position_embeddings", None),
        precision=getattr(m, "precision", "bf16"), recompute=recompute,
        flash_attention=impl == "transformer_engine",
        tensor_parallel=par.tensor_parallel, pipeline_parallel=par.pipeline_parallel,
        virtual_pipeline=getattr(par, "virtual_pipeline", None),
        sequence_parallel=bool(getattr(par, "sequence_parallel", False)),
        vocab_multiple=getattr(par, "vocab_multiple", 128),
        nodes=nodes, gpus_per_node=gpus_per_node,
        prompts_per_step=data.prompts_per_step, group_size=roll.n,
        max_prompt_tokens=data.max_prompt_tokens, max_new_tokens=roll.max_new_tokens,
        ppo_epochs=step.ppo_epochs, mini_batches=step.mini_batches, old_logp=step.old_logp,
        micro_batch_size=step.micro_batch_size, max_tokens_per_microbatch=step.max_tokens_per_microbatch,
        use_distributed_optimizer=config.train.optim.use_distributed_optimizer,
        kl_coef=loss.kl_coef, step_kl=bool(getattr(step, "step_kl", True)),
        rollout_engine=roll.engine, vllm_tensor_parallel=vllm.tensor_parallel,
        gpu_memory_utilization=vllm.gpu_memory_utilization, sync_bucket_mb=vllm.sync_bucket_mb,
        max_num_seqs=roll.max_batch_size,
    )
    max_pos = values["max_position_embeddings"]
    if getattr(data, "task", "math") == "synthetic" and max_pos:
        # the embedded task's prompts are a few tokens and data.max_prompt_tokens (a filter of the
        # math loader) does not apply: take at most the room the model leaves after the response
        values["max_prompt_tokens"] = max(1, min(data.max_prompt_tokens, max_pos - roll.max_new_tokens))
    if getattr(step, "peak_tflops", None):
        values["peak_tflops"] = step.peak_tflops
    values.update({k: v for k, v in cluster.items() if v is not None})
    return PlanInputs(**values)


# ------------------------------------------------------------------------------------- text
def _gib(x: float) -> str:
    return f"{x / GiB:8.2f}"


def _n(x: float) -> str:
    return f"{int(x):,}"


def _time(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.2f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.1f} s"


def format_plan(plan: Plan, title: str = "") -> str:
    i, c, rp, fl = plan.inputs, plan.params, plan.rollout, plan.flops
    out: list[str] = []
    add = out.append
    if title:
        add(title)
    add("")
    add("layout")
    add(f"  world size       {plan.world_size} = {i.nodes} nodes x {i.gpus_per_node} GPUs")
    add(f"  TP x PP x DP     {i.tensor_parallel} x {i.pipeline_parallel} x {plan.data_parallel}"
        f"   (sequence parallel {'on' if i.sequence_parallel else 'off'}, virtual pipeline "
        f"{i.virtual_pipeline or 'off'}, distributed optimizer {'on' if i.use_distributed_optimizer else 'off'})")
    add(f"  precision        {i.precision}, recompute {i.recompute}, attention "
        f"{'fused (flash)' if i.flash_attention else 'unfused (scores stored)'}")
    eng = f"vLLM colocated, {rp.engines} engines x TP {rp.tensor_parallel}" if i.rollout_engine == "vllm" \
        else f"native (trainer layout), {rp.engines} engines"
    add(f"  rollout          {eng}")
    add(f"  batch            {i.prompts_per_step} prompts x G={i.group_size} = {i.prompts_per_step * i.group_size} "
        f"sequences of <= {i.seq_len} tokens; {i.mini_batches} mini-batches x {i.ppo_epochs} epoch(s)")
    mb = f"micro-batch {i.micro_batch_size} seq" if i.micro_batch_size is not None \
        else f"micro-batch <= {i.max_tokens_per_microbatch} tokens"
    add(f"  micro-batches    {plan.microbatches} per mini-batch per DP rank ({mb}); pipeline bubble {plan.bubble:.1%}")
    add("")
    add("parameters")
    add(f"  embedding        {_n(c.embedding):>16}   ({i.vocab_size} x {i.hidden_size}; padded vocab {i.padded_vocab})")
    add(f"  per layer        {_n(c.per_layer):>16}   attention {_n(c.attention)} (q {_n(c.q)}, k+v {_n(c.kv)}, "
        f"o {_n(c.o)}, bias {_n(c.qkv_bias)}, qk-norm {_n(c.qk_norm)}), MLP {_n(c.mlp)}, norms {_n(c.layer_norms)}")
    add(f"  x {i.num_layers} layers {'':<5}{_n(c.layers):>16}")
    add(f"  final norm       {_n(c.final_norm):>16}")
    add(f"  output layer     {_n(c.output):>16}   {'(tied to the embedding)' if i.tie_word_embeddings else ''}".rstrip())
    add(f"  total            {_n(c.total):>16}   ({c.total / 1e9:.2f} B; matmul N for FLOPs {c.matmul / 1e9:.2f} B)")
    shown = sorted({0, i.pipeline_parallel - 1, plan.peak_stage.stage})
    for s in shown:
        r = rank_params(i, s)
        add(f"  per GPU, stage {s:<2}{_n(r.total):>16}   ({r.layers} layers split over TP {i.tensor_parallel}"
            f"{', + embedding' if r.embedding else ''}{', + output' if r.head > i.hidden_size else ''})")
    add("")
    gpu = i.gpu_memory_gib * GiB
    add("memory per GPU (GiB)        " + "".join(f"  stage {s:<3}" for s in shown))
    rows = [
        (f"weights ({'fp32' if i.precision == 'fp32' else 'bf16'})", "weights"),
        ("gradients (fp32)", "grads"),
        (f"optimizer (/DP {plan.data_parallel})" if i.use_distributed_optimizer else "optimizer", "optimizer"),
        ("fp8 weight cache (TE)", "fp8_cache"),
        ("reference model", "reference"),
        ("reserve (ctx, NCCL)", "reserve"),
        ("= resident", "resident"),
        (f"activations ({i.recompute})", "activations"),
        ("recompute working set", "recompute_working"),
        ("logits (last stage)", "logits"),
        ("= train phase peak", "train"),
        ("vLLM (weights + KV)" if i.rollout_engine == "vllm" else "native KV cache", "rollout"),
        ("weight-sync transient", "sync_transient"),
        ("= generate phase peak", "generate"),
        ("PEAK", "peak"),
    ]
    mems = {m.stage: m for m in plan.stages}
    for label, key in rows:
        add(f"  {label:<26}" + "".join(f"  {_gib(getattr(mems[s], key)):>9}" for s in shown))
    add(f"  {'GPU memory':<26}" + "".join(f"  {_gib(gpu):>9}" for _ in shown))
    add("")
    add("rollout")
    if i.rollout_engine == "vllm":
        add(f"  vLLM budget      {rp.budget_bytes / GiB:.2f} GiB = {i.gpu_memory_utilization} x {i.gpu_memory_gib} GiB; "
            f"weights {rp.weight_bytes / GiB:.2f} GiB (bf16, TP {rp.tensor_parallel}); KV cache {rp.kv_bytes / GiB:.2f} GiB")
    add(f"  KV per token     {_n(rp.kv_bytes_per_token_model)} B for the model (2 x {i.num_layers} layers x "
        f"{i.num_kv_heads} kv heads x {i.kv_channels} x {rp.kv_bytes_per_token_model // (2 * i.num_layers * i.num_kv_heads * i.kv_channels)} B), "
        f"{_n(rp.kv_bytes_per_token)} B per GPU")
    add(f"  KV capacity      {_n(rp.kv_tokens)} tokens per engine = {rp.concurrent_sequences} sequences of {i.seq_len} "
        f"(cap {i.max_num_seqs})")
    add(f"  waves            {rp.waves} ({rp.sequences_per_engine} sequences per engine)")
    add("")
    add(f"FLOPs per RL step (PFLOP)   at {i.mfu:.0%} of {i.peak_tflops:g} TFLOP/s x {plan.world_size} GPUs")
    passes = ", ".join(name for name, counted in (("old", i.old_logp_pass), ("reference", i.kl_coef > 0),
                                                  ("step KL", i.step_kl)) if counted)
    for label, value, extra in (
        (f"train (6N + attn) x {i.ppo_epochs} ep", fl.train, f"{fl.train_tokens:,.0f} tokens"),
        (f"recompute ({i.recompute})", fl.recompute, ""),
        (f"log-prob passes x {fl.logprob_passes}", fl.logprob, passes),
        ("rollout (2N + attn)", fl.rollout, f"{fl.generated_tokens:,.0f} generated tokens"),
        ("total executed", fl.total, ""),
    ):
        add(f"  {label:<26}{value / 1e15:10.1f}   {extra}".rstrip())
    add(f"  time: train {_time(fl.train_seconds)}, rollout {_time(fl.rollout_seconds)} (compute "
        f"{_time(fl.rollout_compute_seconds)}, decode bandwidth bound {_time(fl.rollout_memory_seconds)}); "
        f"step {_time(fl.step_seconds)}")
    for note in plan.notes:
        add(f"note: {note}")
    for problem in plan.problems:
        add(f"DOES NOT FIT: {problem}")
    add("")
    sm = plan.summary()
    add("summary: " + " ".join(f"{k}={v}" for k, v in sm.items()))
    return "\n".join(out)


# -------------------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ebpo-plan", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="trainer YAML config (see examples/)")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--mfu", type=float, default=0.4, help="achieved fraction of peak (train side; default 0.4)")
    p.add_argument("--rollout-mfu", type=float, default=None, help="compute-bound generation (default: --mfu)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help=f"dense peak per GPU (default: train.step.peak_tflops or {H100_PEAK_TFLOPS:g}, H100 BF16)")
    p.add_argument("--gpu-memory-gib", type=float, default=H100_MEMORY_GIB, help="memory CUDA reports per GPU")
    p.add_argument("--hbm-tbps", type=float, default=H100_HBM_TBPS, help="HBM bandwidth per GPU, TB/s")
    p.add_argument("--reserve-gib", type=float, default=3.0, help="CUDA context, NCCL buffers, fragmentation")
    p.add_argument("--mean-prompt-tokens", type=float, default=None, help="for FLOPs/time (default: the maximum)")
    p.add_argument("--mean-response-tokens", type=float, default=None, help="for FLOPs/time (default: the maximum)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("overrides", nargs="*", help="dotted.key=value config overrides, as for ebpo-train")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore")
    try:
        from .config.schema import load_config

        config = load_config(args.config, args.overrides)
    except ValueError as err:  # ConfigError is a ValueError
        print(f"ebpo-plan: config error: {err}", file=sys.stderr)
        return 2
    try:
        inp = plan_inputs_from_config(
            config, nodes=args.nodes, gpus_per_node=args.gpus_per_node, mfu=args.mfu,
            rollout_mfu=args.rollout_mfu, peak_tflops=args.peak_tflops, gpu_memory_gib=args.gpu_memory_gib,
            hbm_tbps=args.hbm_tbps, reserve_gib=args.reserve_gib, mean_prompt_tokens=args.mean_prompt_tokens,
            mean_response_tokens=args.mean_response_tokens,
        )
        plan = make_plan(inp)
    except PlanError as err:
        print(f"ebpo-plan: impossible layout: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(plan.to_dict(), indent=1))
    else:
        m = config.model
        title = (f"ebpo-plan: {args.config}  ({m.family}, {m.num_layers} layers, hidden {m.hidden_size}, "
                 f"{getattr(m, 'transformer_impl', 'local')})")
        print(format_plan(plan, title))
    return 0 if plan.fits else 3


__all__ = [
    "PlanInputs", "PlanError", "ParamCounts", "RankParams", "StageMemory", "RolloutPlan", "FlopsPlan", "Plan",
    "count_parameters", "rank_params", "layer_activation_bytes", "recompute_working_bytes", "inflight_layers",
    "microbatches_per_rank", "logits_bytes", "micro_batch_tokens", "data_parallel", "validate", "rollout_plan",
    "stage_memory", "flops_plan", "make_plan", "plan_inputs_from_config", "format_plan", "main",
]

if __name__ == "__main__":
    sys.exit(main())
