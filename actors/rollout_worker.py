"""RolloutWorker: samples completions (with per-token log-probs) and takes live weight pushes.

A plain class; the controller wraps it with ``ray.remote`` (one actor per rollout engine)::

    Worker = ray.remote(num_cpus=1)(RolloutWorker)
    worker = Worker.remote("path/to/hf-model", backend="vllm", seed=0)
    completions = ray.get(worker.generate.remote(prompt_ids, SamplingSettings(n=8, max_new_tokens=8)))
    push_to_workers([worker], version=1, buckets=bucket_state_dict(model.named_parameters()))

Backends
--------
``"vllm"``: a ``vllm.LLM`` engine *inside this process* (``VLLM_ENABLE_V1_MULTIPROCESSING=0``). In a
Ray actor that is what we want: init drops from ~15 s to ~2-3 s, and weight buckets reach the model by
reference (``collective_rpc`` with tensor arguments does not survive the multiprocess engine's msgpack
transport). ``enforce_eager`` (no compile/graph capture), a bounded KV cache (``kv_cache_gib``, passed
as vLLM's ``kv_cache_memory_bytes``), and the engine seed. vLLM-CPU pins its OpenMP threads to the
allowed cores (``VLLM_CPU_OMP_THREADS_BIND``, default ``auto``; set it through the actor's
``runtime_env`` to pin elsewhere) and disables ``torch.set_num_threads`` for the whole process.

``"hf"``: Hugging Face ``generate`` as a fallback, with the same outputs, including per-token
log-probs taken from the generation scores.

Log-prob modes (``SamplingSettings.logprobs_mode``)
---------------------------------------------------
``"processed"``: the log-prob of each sampled token under the distribution it was actually drawn from,
i.e. ``log_softmax(top_k/top_p_mask(logits / T))`` (vLLM ``logprobs_mode="processed_logprobs"``; HF's
``output_scores``, which are the logits after temperature/top-k/top-p warping). This is what RL
importance ratios need when T != 1 or with top-k/top-p. ``"raw"``: ``log_softmax(logits)`` of the
model, ignoring temperature and truncation (vLLM's default ``raw_logprobs``; HF's ``output_logits``).
The two coincide at T=1 without top-k/top-p, and under greedy decoding (vLLM and HF apply no
temperature to greedy rows). In vLLM the mode is an *engine* setting, fixed at construction by
``logprobs_mode``; a request that asks for the other mode is refused unless the two coincide for it.
``sequence_logprobs`` always returns raw (T=1) log-probs: prompt tokens go through no sampler.

Weight sync (``update_weights``)
--------------------------------
Buckets of ``{hf_param_name: numpy array}`` (see :mod:`rayrl.weight_sync`) go through vLLM's layerwise
reload (:class:`rayrl.vllm_ext.WeightSyncExtension`; a bare ``load_weights`` fails on vLLM-CPU, which
repacks linear layers after loading; a tied ``lm_head`` is re-packed too), then the prefix cache is
reset (KV blocks cached before the push were computed by the old weights and would be reused for
repeated prompts). Every ``Completion`` records the policy version that sampled it. On GPUs the same
reload is fed from packed CUDA buffers instead (``update_weights_ipc``, ``update_weights_nccl``; see
:mod:`rayrl.cuda_transfer`).
"""

from __future__ import annotations

import contextlib
import gc
import os
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch

Backend = Literal["vllm", "hf"]
LogprobsMode = Literal["processed", "raw"]
FinishReason = Literal["stop", "length"]

_VLLM_LOGPROBS_MODE = {"processed": "processed_logprobs", "raw": "raw_logprobs"}


@dataclass(frozen=True)
class SamplingSettings:
    """Sampling parameters for one ``generate`` call (the same meaning in both backends).

    ``temperature=0`` is greedy. ``top_k <= 0`` and ``top_p=1`` disable truncation. ``stop`` are stop
    strings (the returned text excludes them; the token that completes one is the last token kept).
    ``stop_token_ids`` add to the model's EOS ids (its ``generation_config.eos_token_id``, e.g. ``<eos>``
    and ``<|end|>`` for the tiny model), which always stop. ``seed``: with a seed the samples are
    reproducible (vLLM: per request, independent of batching; HF: for the same batch); the controller
    should vary it per step, or the same prompts get the same samples. ``seed_offset``: the index of
    this call's first prompt in the caller's whole batch, so that (vLLM) prompt k of the batch gets the
    same samples however the batch is split over workers.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 16
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None
    seed_offset: int = 0
    logprobs_mode: LogprobsMode = "processed"

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"SamplingSettings.n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"SamplingSettings.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingSettings.top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingSettings.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.logprobs_mode not in ("processed", "raw"):
            raise ValueError(f"SamplingSettings.logprobs_mode must be 'processed' or 'raw', got {self.logprobs_mode!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def modes_coincide(self) -> bool:
        """Whether raw and processed log-probs are the same numbers for these settings."""
        return self.greedy or (self.temperature == 1 and self.top_k <= 0 and self.top_p == 1)


@dataclass
class Completion:
    """One sampled completion. ``logprobs[i]`` is the sampler's log-prob of ``token_ids[i]``.

    ``token_ids`` include the stop token when ``finish_reason == "stop"`` because of a stop token
    (EOS); ``text`` is the decoded completion without special tokens and without a matched stop string.
    """

    prompt_index: int
    sample_index: int
    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: FinishReason
    policy_version: int


@dataclass(frozen=True)
class SyncStats:
    """What one ``update_weights`` call cost on this worker."""

    version: int
    seconds: float  # total, fetch + load + prefix-cache reset
    fetch_seconds: float  # ray.get of the bucket refs (zero-copy from the local object store)
    load_seconds: float  # layerwise reload into the engine
    bytes: int
    num_buckets: int
    num_tensors: int

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def bucket_to_tensors(bucket: Mapping[str, np.ndarray]) -> list[tuple[str, torch.Tensor]]:
    """``{name: numpy}`` -> ``[(name, tensor)]`` without copying (bf16 arrives as tagged uint16)."""
    from rayrl.weight_sync import numpy_to_tensor

    with warnings.catch_warnings():
        # Arrays from ray.get are read-only views of the object store; the loaders only read them.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return [(name, numpy_to_tensor(array)) for name, array in bucket.items()]


def _resolve_buckets(buckets: Sequence[Any]) -> list[Mapping[str, np.ndarray]]:
    """Buckets may be ObjectRefs (the controller passes refs inside a list, so Ray does not resolve
    them for us) or plain dicts. All are fetched *before* the engine is touched: a failed fetch must
    not leave the model half-way through a layerwise reload."""
    refs = [i for i, b in enumerate(buckets) if not isinstance(b, Mapping)]
    resolved: list[Any] = list(buckets)
    if refs:
        import ray

        for i, value in zip(refs, ray.get([buckets[i] for i in refs])):
            resolved[i] = value
    for b in resolved:
        if not isinstance(b, Mapping):
            raise TypeError(f"a weight bucket must be a dict of numpy arrays or an ObjectRef to one, got {type(b)}")
    return resolved


class RolloutWorker:
    """Rollout engine with versioned live weight updates.

    Args:
        model_path: a local Hugging Face model directory (no hub access is assumed).
        backend: ``"vllm"`` or ``"hf"``.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"`` for the engine's weights.
        seed: engine seed (vLLM ``LLM(seed=...)``; HF global torch seed at construction).
        kv_cache_gib: KV-cache size (vLLM ``kv_cache_memory_bytes``, honoured on CPU and GPU; it
            replaces the integer-GiB ``VLLM_CPU_KVCACHE_SPACE``, which is dropped from this process's
            environment because it would override it). None: vLLM's default sizing.
        max_model_len: context bound for the vLLM engine (defaults to the model's).
        logprobs_mode: the vLLM engine's log-prob mode ("processed" for RL, see the module doc).
        enable_prefix_caching: vLLM prefix caching (reset after each push either way).
        initial_version: the policy version of the weights loaded from ``model_path``.
        hf_batch_size: prompts per HF ``generate`` call.
        num_threads: torch intra-op threads for the HF backend (vLLM-CPU binds its own).
        enable_sleep_mode: GPU only: let ``sleep(level>=1)`` offload/discard weights and KV cache.
        extra_engine_args: further ``vllm.LLM`` keyword arguments.
    """

    def __init__(
        self,
        model_path: str,
        *,
        backend: Backend = "vllm",
        dtype: str = "float32",
        seed: int = 0,
        kv_cache_gib: float | None = 1.0,
        max_model_len: int | None = None,
        logprobs_mode: LogprobsMode = "processed",
        enable_prefix_caching: bool = True,
        initial_version: int = 0,
        hf_batch_size: int = 64,
        num_threads: int | None = None,
        enable_sleep_mode: bool = False,
        extra_engine_args: Mapping[str, Any] | None = None,
    ) -> None:
        if backend not in ("vllm", "hf"):
            raise ValueError(f"backend must be 'vllm' or 'hf', got {backend!r}")
        if logprobs_mode not in _VLLM_LOGPROBS_MODE:
            raise ValueError(f"logprobs_mode must be 'processed' or 'raw', got {logprobs_mode!r}")
        self.backend: Backend = backend
        self.model_path = model_path
        self.logprobs_mode: LogprobsMode = logprobs_mode
        self.hf_batch_size = hf_batch_size
        self._version = initial_version
        self._asleep_level: int | None = None
        self._broken: str | None = None
        self._broadcast: Any = None  # NCCL communicator from trainer rank 0 (HF backend, GPU)
        self._llm: Any = None
        self._model: Any = None

        from transformers import AutoTokenizer, GenerationConfig

        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.eos_token_ids = _eos_ids(model_path, self.tokenizer, GenerationConfig)

        if backend == "vllm":
            self._init_vllm(dtype, seed, kv_cache_gib, max_model_len, enable_prefix_caching,
                            enable_sleep_mode,
                            dict(extra_engine_args or {}))
        else:
            self._init_hf(dtype, seed, num_threads)

    # ------------------------------------------------------------------ construction

    def _init_vllm(self, dtype, seed, kv_cache_gib, max_model_len, enable_prefix_caching,
                   enable_sleep_mode, extra) -> None:
        # Must be set before vLLM reads its environment (the import below is the first in this process
        # when running as a Ray actor). In-process engine: tensors in collective_rpc pass by reference.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if kv_cache_gib is not None:
            os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
        from vllm import LLM
        from vllm.platforms import current_platform

        self._on_cpu = current_platform.is_cpu()
        self._sleep_supported = enable_sleep_mode and current_platform.is_sleep_mode_available()
        kwargs: dict[str, Any] = dict(
            model=self.model_path,
            dtype=dtype,
            seed=seed,
            enforce_eager=True,
            logprobs_mode=_VLLM_LOGPROBS_MODE[self.logprobs_mode],
            worker_extension_cls="rayrl.vllm_ext.WeightSyncExtension",
            enable_prefix_caching=enable_prefix_caching,
        )
        if kv_cache_gib is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * (1 << 30))
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        if not self._on_cpu:
            kwargs["enable_sleep_mode"] = self._sleep_supported
        kwargs.update(extra)
        self._llm = LLM(**kwargs)

    def _init_hf(self, dtype, seed, num_threads) -> None:
        from transformers import AutoModelForCausalLM

        if num_threads is not None:
            torch.set_num_threads(num_threads)
        torch.manual_seed(seed)
        self._on_cpu = not torch.cuda.is_available()
        self._sleep_supported = False
        device = "cpu" if self._on_cpu else "cuda"
        self._model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=getattr(torch, dtype)).to(device)
        self._model.eval()
        self._device = torch.device(device)

    # ------------------------------------------------------------------ public API

    def policy_version(self) -> int:
        return self._version

    def generate(self, prompts: list[list[int]], sampling: SamplingSettings) -> list[Completion]:
        """Sample ``sampling.n`` completions per prompt; the result is prompt-major
        (``[p0s0, p0s1, ..., p1s0, ...]``), each stamped with the current policy version."""
        self._check_ready()
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate needs a non-empty list of non-empty prompts (token ids)")
        prompts = [[int(t) for t in p] for p in prompts]
        if self.backend == "vllm":
            return self._generate_vllm(prompts, sampling)
        return self._generate_hf(prompts, sampling)

    def sequence_logprobs(self, token_ids: list[list[int]], prompt_lens: list[int]) -> list[list[float]]:
        """The engine's raw (T=1) log-probs of ``seq[prompt_len:]`` for each sequence.

        vLLM: a ``prompt_logprobs`` request with ``max_tokens=1`` (prompt tokens skip the prefix cache,
        so this checks the *weights*; it cannot see prefix-cache staleness: compare generations for that).
        """
        self._check_ready()
        if len(token_ids) != len(prompt_lens):
            raise ValueError("token_ids and prompt_lens must have the same length")
        for seq, plen in zip(token_ids, prompt_lens):
            if not 1 <= plen <= len(seq):
                raise ValueError(f"prompt_len must be in [1, len(seq)], got {plen} for a sequence of {len(seq)}")
        if self.backend == "vllm":
            return self._sequence_logprobs_vllm(token_ids, prompt_lens)
        return self._sequence_logprobs_hf(token_ids, prompt_lens)

    def update_weights(self, version: int, buckets: list) -> SyncStats:
        """Load new weights (HF names, any subset of the model) and set the policy version.

        ``buckets``: a list of ``{hf_name: numpy array}`` dicts or of ObjectRefs to them (the
        controller passes refs *inside a list*, so this actor fetches them itself, zero-copy from the
        node's object store). One engine call per bucket, never one per parameter.
        """
        self._check_push(version)
        start = time.perf_counter()
        resolved = _resolve_buckets(buckets)
        fetched = time.perf_counter()
        nbytes = sum(int(a.nbytes) for b in resolved for a in b.values())
        ntensors = sum(len(b) for b in resolved)
        if self.backend == "vllm":
            self._reload_vllm([("rayrl_load_weights", (bucket_to_tensors(b),)) for b in resolved])
        else:
            self._load_hf(bucket_to_tensors(b) for b in resolved)
        return self._pushed(version, start, fetched, nbytes, len(resolved), ntensors)

    def update_weights_ipc(self, version: int, shared: list[dict]) -> SyncStats:
        """Load weights a colocated trainer packed on this GPU: ``shared`` holds one
        ``{"handles": {gpu_uuid: ipc args}, "layout": BucketLayout}`` per bucket (see
        :mod:`rayrl.cuda_transfer`). The trainer keeps the buffers alive until this returns."""
        from rayrl.cuda_transfer import open_ipc, unpack_bucket

        self._check_push(version)
        start = time.perf_counter()
        nbytes = sum(b["layout"].nbytes for b in shared)
        ntensors = sum(len(b["layout"].names) for b in shared)
        if self.backend == "vllm":
            self._reload_vllm([("rayrl_load_ipc_bucket", (b["handles"], b["layout"])) for b in shared])
        else:
            self._load_hf(unpack_bucket(open_ipc(b["handles"]), b["layout"]) for b in shared)
            torch.cuda.synchronize()
        return self._pushed(version, start, start, nbytes, len(shared), ntensors)

    def init_weight_broadcast(self, host: str, port: int, rank_offset: int, world_size: int) -> None:
        """Join trainer rank 0's NCCL group (split layouts); call concurrently with the trainer's
        ``init_weight_broadcast``. ``rank_offset``: this engine's first rank in the group."""
        if self.backend == "vllm":
            self._llm.collective_rpc("rayrl_init_nccl", args=(host, port, rank_offset, world_size))
        else:
            from rayrl.cuda_transfer import nccl_communicator

            self._broadcast = nccl_communicator(host, port, rank_offset, world_size, torch.cuda.current_device())

    def update_weights_nccl(self, version: int) -> SyncStats:
        """Receive one broadcast push from trainer rank 0 (call concurrently with its
        ``broadcast_weights``)."""
        self._check_push(version)
        start = time.perf_counter()
        if self.backend == "vllm":
            counts = self._reload_vllm([("rayrl_receive_nccl", ())])
            ntensors = counts[0]
        else:
            from rayrl.cuda_transfer import broadcast_buckets

            received = list(broadcast_buckets(self._broadcast, None, None))
            self._load_hf(pairs for pairs, _ in received)
            ntensors = sum(len(pairs) for pairs, _ in received)
        return self._pushed(version, start, start, 0, 0, ntensors)

    def _check_push(self, version: int) -> None:
        if self._broken:
            raise RuntimeError(self._broken)
        if version < self._version:
            raise ValueError(f"policy version must not go backwards: {version} < {self._version}")

    def _pushed(self, version: int, start: float, fetched: float, nbytes: int, nbuckets: int, ntensors: int) -> SyncStats:
        done = time.perf_counter()
        self._version = version
        return SyncStats(version=version, seconds=done - start, fetch_seconds=fetched - start,
                         load_seconds=done - fetched, bytes=nbytes, num_buckets=nbuckets, num_tensors=ntensors)

    def sleep(self, level: int = 1) -> None:
        """Pause the engine between rollout phases.

        With GPU sleep mode (``enable_sleep_mode=True`` on CUDA) level 1 offloads weights and drops the
        KV cache, level 2 discards both. On CPU vLLM frees nothing ("sleep mode is not supported on
        CPU"); there, and for the HF backend, this is a level-0 pause: the scheduler stops, nothing is
        freed. ``generate``/``sequence_logprobs`` raise until ``wake_up``. Idempotent.
        """
        if self._asleep_level is not None:
            return
        effective = level if self._sleep_supported else 0
        if self._llm is not None:
            self._llm.sleep(level=effective)
        self._asleep_level = effective

    def wake_up(self) -> None:
        """Resume after ``sleep`` (no-op when awake). After a GPU level-2 sleep push weights before
        sampling: the engine's weights were discarded."""
        if self._asleep_level is None:
            return
        if self._llm is not None:
            self._llm.wake_up(tags=["scheduling"] if self._asleep_level == 0 else None)
        self._asleep_level = None

    def shutdown(self) -> None:
        """Drop the engine/model and free its memory (the actor itself is killed by the controller)."""
        self._llm = None
        self._model = None
        gc.collect()
        if self.backend == "vllm":
            try:
                from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

                cleanup_dist_env_and_memory()
            except Exception:  # best effort: the process is about to go away anyway
                pass

    def _check_ready(self) -> None:
        if self._broken:
            raise RuntimeError(self._broken)
        if self._asleep_level is not None:
            raise RuntimeError("RolloutWorker is asleep: call wake_up() first")
        if self._llm is None and self._model is None:
            raise RuntimeError("RolloutWorker was shut down")

    def _check_logprobs_mode(self, sampling: SamplingSettings) -> None:
        if sampling.logprobs_mode != self.logprobs_mode and not sampling.modes_coincide:
            raise ValueError(
                f"this vLLM engine was built with logprobs_mode={self.logprobs_mode!r} (an engine-level "
                f"setting); {sampling.logprobs_mode!r} log-probs at T={sampling.temperature}, "
                f"top_k={sampling.top_k}, top_p={sampling.top_p} differ. Build another worker.")

    def _generate_vllm(self, prompts: list[list[int]], sampling: SamplingSettings) -> list[Completion]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self._check_logprobs_mode(sampling)
        stop_ids = sorted(set(self.eos_token_ids) | set(sampling.stop_token_ids))
        # Greedy: vLLM refuses n > 1; decode once and replicate (the n samples would be identical).
        reps = 1 if sampling.greedy else sampling.n
        params = []
        for i in range(len(prompts)):
            # Per-request seeds, independent of how the engine batches. vLLM gives child j of an
            # n-sample request seed + j, so the request seeds are hashed from (seed, prompt index):
            # plain seed + i would make prompt i's sample j+1 equal to prompt i+1's... under seed + 1.
            seed = None if sampling.seed is None else _request_seed(sampling.seed, sampling.seed_offset + i)
            params.append(SamplingParams(
                n=reps, temperature=sampling.temperature, top_p=sampling.top_p,
                top_k=sampling.top_k if sampling.top_k > 0 else 0, max_tokens=sampling.max_new_tokens,
                stop=list(sampling.stop) or None, stop_token_ids=stop_ids, seed=seed, logprobs=0,
            ))
        outputs = self._llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        completions = []
        for i, (prompt, out) in enumerate(zip(prompts, outputs)):
            samples = sorted(out.outputs, key=lambda o: o.index)
            if len(samples) != reps:
                raise RuntimeError(f"vLLM returned {len(samples)} samples for prompt {i}, expected {reps}")
            for j in range(sampling.n):
                sample = samples[j % reps]
                if sample.finish_reason not in ("stop", "length"):
                    raise RuntimeError(f"vLLM finished a request with {sample.finish_reason!r}")
                token_ids = list(sample.token_ids)
                completions.append(Completion(
                    prompt_index=i, sample_index=j, prompt_ids=prompt, token_ids=token_ids,
                    logprobs=_sampled_logprobs(sample.logprobs, token_ids), text=sample.text,
                    finish_reason=sample.finish_reason, policy_version=self._version,
                ))
        return completions

    def _sequence_logprobs_vllm(self, token_ids, prompt_lens) -> list[list[float]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        outputs = self._llm.generate([TokensPrompt(prompt_token_ids=list(map(int, s))) for s in token_ids],
                                     params, use_tqdm=False)
        result = []
        for seq, plen, out in zip(token_ids, prompt_lens, outputs):
            # prompt_logprobs[0] is None (nothing predicts the first token); entry k scores seq[k].
            result.append([_logprob_of(out.prompt_logprobs[k], int(seq[k])) for k in range(plen, len(seq))])
        return result

    def _reload_vllm(self, loads: list[tuple[str, tuple]]) -> list[int]:
        """One layerwise reload: begin, the given ``(extension method, args)`` loads, finish.
        Returns each load's tensor count (from the first vLLM worker)."""
        llm = self._llm
        llm.collective_rpc("rayrl_begin_weight_update")
        try:
            counts = [llm.collective_rpc(method, args=args)[0] for method, args in loads]
        except BaseException as exc:
            # Layers that were partly loaded now mix new and uninitialised values. Finalising puts
            # untouched layers back, but the model as a whole is no longer any policy version:
            # refuse to sample from it (the controller recreates the worker).
            self._broken = (f"RolloutWorker: a weight push failed mid-way ({exc!r}); "
                            "the engine's weights are inconsistent, recreate the worker")
            with contextlib.suppress(Exception):
                llm.collective_rpc("rayrl_finish_weight_update")
            raise
        llm.collective_rpc("rayrl_finish_weight_update")
        # Prefix-cache trap: cached KV blocks were computed by the old weights.
        llm.reset_prefix_cache()
        return counts

    # ------------------------------------------------------------------ HF backend

    @torch.no_grad()
    def _generate_hf(self, prompts: list[list[int]], sampling: SamplingSettings) -> list[Completion]:
        from transformers import GenerationConfig

        stop_ids = sorted(set(self.eos_token_ids) | set(sampling.stop_token_ids))
        raw = sampling.logprobs_mode == "raw"
        # Greedy: HF refuses num_return_sequences > 1; decode once, replicate (vLLM's n greedy
        # samples are identical too).
        warpers = {} if sampling.greedy else dict(
            # Explicit "off" values: unset fields fall back to transformers' defaults (top_k=50).
            temperature=sampling.temperature, top_k=max(sampling.top_k, 0), top_p=sampling.top_p)
        config = GenerationConfig(
            do_sample=not sampling.greedy, max_new_tokens=sampling.max_new_tokens,
            num_return_sequences=1 if sampling.greedy else sampling.n,
            eos_token_id=stop_ids, pad_token_id=self.pad_token_id,
            output_scores=not raw, output_logits=raw, return_dict_in_generate=True, **warpers,
        )
        completions: list[Completion] = []
        rng = torch.random.fork_rng(devices=[]) if sampling.seed is not None else contextlib.nullcontext()
        with rng:
            if sampling.seed is not None:
                torch.manual_seed(_request_seed(sampling.seed, sampling.seed_offset))
            for start in range(0, len(prompts), self.hf_batch_size):
                chunk = prompts[start:start + self.hf_batch_size]
                completions += self._generate_hf_chunk(chunk, start, sampling, config, stop_ids, raw)
        return completions

    def _generate_hf_chunk(self, prompts, offset, sampling, config, stop_ids, raw) -> list[Completion]:
        width = max(len(p) for p in prompts)
        # Left padding: every row's next token is at the same column.
        input_ids = torch.tensor([[self.pad_token_id] * (width - len(p)) + p for p in prompts], device=self._device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self._device)
        out = self._model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config)
        new_tokens = out.sequences[:, width:].tolist()
        steps = out.logits if raw else out.scores  # one [rows, vocab] tensor per generated step
        logprobs = torch.stack([s.float().log_softmax(-1) for s in steps], dim=1)  # [rows, steps, vocab]
        token_lp = logprobs.gather(-1, out.sequences[:, width:, None]).squeeze(-1).tolist()
        stop_set = set(stop_ids)
        completions = []
        reps = config.num_return_sequences
        for row, (tokens, lps) in enumerate(zip(new_tokens, token_lp)):
            i, j = divmod(row, reps)
            finish: FinishReason = "length"
            for k, t in enumerate(tokens):
                if t in stop_set:
                    tokens, lps, finish = tokens[:k + 1], lps[:k + 1], "stop"
                    break
            body = tokens[:-1] if finish == "stop" else tokens
            text = self.tokenizer.decode(body, skip_special_tokens=True)
            if sampling.stop:
                cut = _cut_at_stop_string(self.tokenizer, body, sampling.stop)
                if cut is not None:
                    k, text = cut
                    tokens, lps, finish = tokens[:k], lps[:k], "stop"
            for j in range(j, j + sampling.n - reps + 1):  # one pass, or n copies of the greedy decode
                completions.append(Completion(
                    prompt_index=offset + i, sample_index=j, prompt_ids=prompts[i], token_ids=list(tokens),
                    logprobs=list(lps), text=text, finish_reason=finish, policy_version=self._version,
                ))
        return completions

    @torch.no_grad()
    def _sequence_logprobs_hf(self, token_ids, prompt_lens) -> list[list[float]]:
        width = max(len(s) for s in token_ids)
        # Right padding is harmless for a causal model: real positions never attend to later pads.
        ids = torch.tensor([list(s) + [self.pad_token_id] * (width - len(s)) for s in token_ids], device=self._device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in token_ids], device=self._device)
        logits = self._model(input_ids=ids, attention_mask=mask).logits.float()
        lp = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        return [lp[r, plen - 1:len(s) - 1].tolist() for r, (s, plen) in enumerate(zip(token_ids, prompt_lens))]

    @torch.no_grad()
    def _load_hf(self, buckets: Iterable[Sequence[tuple[str, torch.Tensor]]]) -> None:
        # state_dict() tensors share storage with the parameters: copy_ updates the model in place
        # (and casts). Tied weights appear under both names; either name updates both.
        state = self._model.state_dict()
        for pairs in buckets:
            for name, tensor in pairs:
                if name not in state:
                    raise KeyError(f"update_weights: unknown parameter {name!r}")
                state[name].copy_(tensor)


# ---------------------------------------------------------------------- helpers


def _eos_ids(model_path: str, tokenizer, generation_config_cls) -> list[int]:
    """The model's stop token ids: generation_config.eos_token_id (int or list) plus the tokenizer's."""
    ids: set[int] = set()
    try:
        eos = generation_config_cls.from_pretrained(model_path).eos_token_id
    except OSError:  # no generation_config.json
        eos = None
    if eos is not None:
        ids |= set(eos if isinstance(eos, list) else [eos])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def _request_seed(seed: int, prompt_index: int) -> int:
    return int(np.random.SeedSequence([seed, prompt_index]).generate_state(1, np.uint32)[0] >> 1)


def _logprob_of(position, token_id: int) -> float:
    """The log-prob of ``token_id`` at one position of a vLLM logprobs list (dict or flat view)."""
    return float(position[token_id].logprob)


def _sampled_logprobs(logprobs, token_ids: list[int]) -> list[float]:
    if logprobs is None or len(logprobs) != len(token_ids):
        raise RuntimeError("vLLM returned no per-token logprobs for a completion")
    return [_logprob_of(pos, t) for pos, t in zip(logprobs, token_ids)]


def _cut_at_stop_string(tokenizer, tokens: list[int], stops: Sequence[str]) -> tuple[int, str] | None:
    """vLLM's stop-string rule for the HF backend: stop at the first token whose decoded prefix
    contains a stop string; keep tokens up to and including it; text up to the stop string."""
    for k in range(1, len(tokens) + 1):
        text = tokenizer.decode(tokens[:k], skip_special_tokens=True)
        hits = [text.find(s) for s in stops if s and s in text]
        if hits:
            return k, text[:min(hits)]
    return None
