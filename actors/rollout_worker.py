"""RolloutWorker: samples completions (with per-token log-probs) and takes live weight pushes.

A plain class; the controller wraps it with ``ray.remote`` (one actor per rollout engine)::

    Worker = ray.remote(num_cpus=1)(RolloutWorker)
    worker = Worker.remote("path/to/hf-model", backend="vllm", seed=0)
    completions = ray.get(worker.generate.remote(prompt_ids, SamplingSettings(n=8, max_new_tokens=8)))
    push_to_workers([worker], version=1, buckets=bucket_state_dict(model.named_parameters()))

The worker holds one backend behind :class:`rayrl.actors.rollout_engines.RolloutEngine`
(``"vllm"``: ``VLLMEngine``, ``"hf"``: ``HFEngine``; backends and log-prob modes are described
there) and keeps what is the same for both: input checks, sleep state, policy versions and the
bookkeeping of weight pushes (``SyncStats``).

Weight sync (``update_weights``)
--------------------------------
Buckets of ``{hf_param_name: numpy array}`` (see :mod:`rayrl.weight_sync`) go through vLLM's layerwise
reload (:class:`rayrl.vllm_ext.WeightSyncExtension`; a bare ``load_weights`` fails on vLLM-CPU, which
repacks linear layers after loading; a tied ``lm_head`` is re-packed too), then the prefix cache is
reset (KV blocks cached before the push were computed by the old weights and would be reused for
repeated prompts). Every ``Completion`` records the policy version that sampled it. On GPUs the same
reload is fed from packed CUDA buffers instead (``update_weights_ipc``, ``update_weights_nccl``; see
:mod:`rayrl.cuda_transfer`).

Partial rollouts (``partial_rollouts=True``, vLLM only)
-----------------------------------------------------
The actor is started with a second concurrency group (``WORKER_CONCURRENCY_GROUPS``) and pushes are
sent to it (``rayrl.weight_sync.WEIGHT_LOAD_GROUP``), so a push reaches the worker while a ``generate``
runs. The push fetches and checks its buckets on its own thread, then hands the load to the generating
thread, which runs it between two engine steps (``LoadHandoff``; vLLM is never entered from two
threads): the requests in flight go on under the new weights, and each completion records the token
where each version took over (``Completion.version_changes``).
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Generic, Literal, TypeVar

import numpy as np
import torch

from rayrl.actors.rollout_engines import (Completion, HFEngine, LogprobsMode, RolloutEngine, SamplingSettings,
                                          VLLMEngine)
from rayrl.remote import ActorUnusable
from rayrl.weight_sync import WEIGHT_LOAD_GROUP, check_checksums, numpy_to_tensor

# Completion and SamplingSettings are re-exported: callers import them from here with the worker.
__all__ = ["Backend", "Completion", "LoadHandoff", "RolloutWorker", "SamplingSettings", "SyncStats",
           "WORKER_CONCURRENCY_GROUPS", "bucket_to_tensors"]

Backend = Literal["vllm", "hf"]

# Ray ``concurrency_groups`` of a worker with partial rollouts (``ray.remote(concurrency_groups=...)``; Ray
# refuses them in ``.options()``): pushes run beside a generate in flight.
WORKER_CONCURRENCY_GROUPS = {WEIGHT_LOAD_GROUP: 1}
# The longest a probe waits for the push it was sent after (a push's fetch runs on its own thread).
PUSH_WAIT_S = 600.0

T = TypeVar("T")


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
        import ray  # slow: only a push of ObjectRefs needs it

        for i, value in zip(refs, ray.get([buckets[i] for i in refs])):
            resolved[i] = value
    for b in resolved:
        if not isinstance(b, Mapping):
            raise TypeError(f"a weight bucket must be a dict of numpy arrays or an ObjectRef to one, got {type(b)}")
    return resolved


class _QueuedLoad(Generic[T]):
    """A load handed to the engine's thread; the pushing thread waits for its outcome."""

    def __init__(self, apply: Callable[[], T]):
        self.apply = apply
        self.done = threading.Event()
        self.value: T | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.value = self.apply()
        except BaseException as exc:  # handed to the pushing thread, which raises it
            self.error = exc
        finally:
            self.done.set()

    def result(self) -> T:
        # No deadline here: the engine's thread runs it by the end of its call at the latest, and the
        # controller's deadline on the push (fault.timeouts.sync_s) replaces a worker stuck in a call.
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.value  # type: ignore[return-value]


class LoadHandoff:
    """Keeps the engine to one thread at a time when pushes arrive on their own thread (partial rollouts).

    ``engine_call`` (a generate, a probe) owns the engine; a ``load`` arriving meanwhile is queued and run
    by that thread: between engine steps (``run_queued``) or, at the latest, before it lets go. A load
    arriving while the engine is free runs at once on its own thread."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._owner: Literal["call", "load"] | None = None
        self._queued: list[_QueuedLoad] = []

    @contextmanager
    def engine_call(self, ready: Callable[[], bool] = lambda: True, wait_s: float = PUSH_WAIT_S,
                    waiting_for: str = "") -> Iterator[None]:
        """Own the engine once it is free and ``ready()`` holds (loads notify on finishing); a
        ``TimeoutError`` naming ``waiting_for`` after ``wait_s``."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._owner is None and ready(), timeout=wait_s):
                raise TimeoutError(f"RolloutWorker: {waiting_for or 'the engine'} did not come within {wait_s:.0f} s")
            self._owner = "call"
        try:
            yield
        finally:
            while True:
                with self._cond:
                    if not self._queued:
                        self._owner = None
                        self._cond.notify_all()
                        break
                self.run_queued()

    @property
    def queued(self) -> int:
        """Loads waiting for the thread that owns the engine."""
        with self._cond:
            return len(self._queued)

    def run_queued(self) -> None:
        """Run the loads queued so far (on the thread that owns the engine)."""
        with self._cond:
            queued, self._queued = self._queued, []
        for load in queued:
            load.run()

    def load(self, apply: Callable[[], T]) -> T:
        """``apply()`` on the engine: now if it is free, else by the thread that owns it."""
        queued: _QueuedLoad[T] | None = None
        with self._cond:
            while True:
                if self._owner == "call":
                    queued = _QueuedLoad(apply)
                    self._queued.append(queued)
                    break
                if self._owner is None:
                    self._owner = "load"
                    break
                self._cond.wait()
        if queued is not None:
            return queued.result()
        try:
            return apply()
        finally:
            with self._cond:
                self._owner = None
                self._cond.notify_all()


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
        logprobs_mode: the vLLM engine's log-prob mode ("processed" for RL, see
            :mod:`rayrl.actors.rollout_engines`).
        enable_prefix_caching: vLLM prefix caching (reset after each push either way).
        initial_version: the policy version of the weights loaded from ``model_path``.
        hf_batch_size: prompts per HF ``generate`` call.
        num_threads: torch intra-op threads for the HF backend (vLLM-CPU binds its own).
        enable_sleep_mode: GPU only: let ``sleep(level>=1)`` offload/discard weights and KV cache.
        partial_rollouts: vLLM only: load pushes between engine steps of a generate in flight (start
            the actor with ``concurrency_groups=WORKER_CONCURRENCY_GROUPS``; see the module doc).
        lora_rank: vLLM only: serve pushed LoRA adapters up to this rank over the base weights of
            ``model_path`` (``rollout.lora_sync: adapter``), on ``lora_target_modules`` (None: every
            linear layer but the output head).
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
        partial_rollouts: bool = False,
        lora_rank: int | None = None,
        lora_target_modules: list[str] | None = None,
        extra_engine_args: Mapping[str, Any] | None = None,
    ) -> None:
        if backend not in ("vllm", "hf"):
            raise ValueError(f"backend must be 'vllm' or 'hf', got {backend!r}")
        if partial_rollouts and backend != "vllm":
            raise ValueError("partial_rollouts needs the vllm backend: hf generate cannot load weights mid-call")
        if lora_rank is not None and backend != "vllm":
            raise ValueError("lora_rank needs the vllm backend: the hf backend serves merged weights only")
        if logprobs_mode not in ("processed", "raw"):
            raise ValueError(f"logprobs_mode must be 'processed' or 'raw', got {logprobs_mode!r}")
        self.backend: Backend = backend
        self.model_path = model_path
        self.logprobs_mode: LogprobsMode = logprobs_mode
        self.hf_batch_size = hf_batch_size
        self._version = initial_version
        self._damage_pushes = 0  # damage_next_pushes_for_test
        self._asleep = False
        self.partial_rollouts = partial_rollouts
        self._loads = LoadHandoff()

        from transformers import AutoTokenizer, GenerationConfig  # slow: transformers

        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.eos_token_ids = _eos_ids(model_path, self.tokenizer, GenerationConfig)

        self._engine: RolloutEngine
        if backend == "vllm":
            self._engine = VLLMEngine(
                model_path, self.eos_token_ids, dtype=dtype, seed=seed, kv_cache_gib=kv_cache_gib,
                max_model_len=max_model_len, logprobs_mode=logprobs_mode,
                enable_prefix_caching=enable_prefix_caching, enable_sleep_mode=enable_sleep_mode,
                extra_engine_args=dict(extra_engine_args or {}), lora_rank=lora_rank,
                lora_target_modules=lora_target_modules)
        else:
            self._engine = HFEngine(
                model_path, self.tokenizer, self.pad_token_id, self.eos_token_ids, dtype=dtype, seed=seed,
                num_threads=num_threads, batch_size=hf_batch_size)

    @property
    def engine(self) -> RolloutEngine:
        """The backend (in-process use only, e.g. ``HFEngine.model`` for a checksum; not a Ray method)."""
        return self._engine

    # ------------------------------------------------------------------ public API

    def policy_version(self) -> int:
        return self._version

    def generate(self, prompts: list[list[int]], sampling: SamplingSettings,
                 min_version: int | None = None) -> list[Completion]:
        """Sample ``sampling.n`` completions per prompt; the result is prompt-major
        (``[p0s0, p0s1, ..., p1s0, ...]``), each stamped with the current policy version.

        ``min_version`` (partial rollouts): start only once the engine holds at least that version (a push
        sent before this call may still be fetching on its own thread; the staleness bound counts from the
        version that starts a sample). Without partial rollouts a call runs after every push sent before
        it, and this is not needed."""
        self._check_ready()
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate needs a non-empty list of non-empty prompts (token ids)")
        prompts = [[int(t) for t in p] for p in prompts]
        if not self.partial_rollouts:
            return self._engine.generate(prompts, sampling, self._version)
        with self._engine_holding(min_version):
            return self._engine.generate(prompts, sampling, self._version, between_steps=self._load_queued)

    def sequence_logprobs(self, token_ids: list[list[int]], prompt_lens: list[int],
                          min_version: int | None = None) -> list[list[float]]:
        """The engine's raw (T=1) log-probs of ``seq[prompt_len:]`` for each sequence, once the engine
        holds at least ``min_version`` (a probe sent after a push; with partial rollouts the push runs on
        its own thread and may still be fetching).

        vLLM: a ``prompt_logprobs`` request with ``max_tokens=1`` (prompt tokens skip the prefix cache,
        so this checks the *weights*; it cannot see prefix-cache staleness: compare generations for that).
        """
        self._check_ready()
        if len(token_ids) != len(prompt_lens):
            raise ValueError("token_ids and prompt_lens must have the same length")
        for seq, plen in zip(token_ids, prompt_lens):
            if not 1 <= plen <= len(seq):
                raise ValueError(f"prompt_len must be in [1, len(seq)], got {plen} for a sequence of {len(seq)}")
        with self._engine_holding(min_version):
            return self._engine.sequence_logprobs(token_ids, prompt_lens)

    def update_weights(self, version: int, buckets: list, checksums: list[dict[str, int]] | None = None,
                       adapter_config: dict | None = None) -> SyncStats:
        """Load new weights (HF names, any subset of the model) and set the policy version. With
        ``adapter_config`` the buckets are a LoRA adapter (PEFT's file names), served from now on over the
        base weights instead (the worker needs ``lora_rank``).

        ``buckets``: a list of ``{hf_name: numpy array}`` dicts or of ObjectRefs to them (the
        controller passes refs *inside a list*, so this actor fetches them itself, zero-copy from the
        node's object store). One engine call per bucket, never one per parameter. ``checksums``
        (per bucket, the CRC-32 of each tensor as sent) are checked before the engine is touched:
        a damaged tensor raises ``WeightChecksumError`` naming it, and the engine keeps its weights.
        """
        self._check_push(version)
        start = time.perf_counter()
        resolved = _resolve_buckets(buckets)
        if self._damage_pushes > 0:
            self._damage_pushes -= 1
            resolved = _flip_first_byte(resolved)
        if checksums is not None:
            check_checksums(resolved, checksums, version)
        fetched = time.perf_counter()
        nbytes = sum(int(a.nbytes) for b in resolved for a in b.values())
        ntensors = sum(len(b) for b in resolved)

        def load() -> SyncStats:
            self._check_push(version)  # again: the engine may have broken while this waited
            if adapter_config is not None:
                self._engine.load_adapter(dict(pair for b in resolved for pair in bucket_to_tensors(b)), adapter_config)
            else:
                self._engine.load_weights([bucket_to_tensors(b) for b in resolved])
            return self._pushed(version, start, fetched, nbytes, len(resolved), ntensors)

        return self._loads.load(load)

    def rewind_version(self, version: int) -> None:
        """Set the policy version back (the run went back to a checkpoint): the weights of that
        version are pushed next."""
        self._version = min(self._version, version)

    def damage_next_pushes_for_test(self, count: int) -> None:
        """Test hook: flip a byte of the first tensor of the next ``count`` object-store pushes after
        they arrive, as a faulty transfer would (the checksum guard must catch it)."""
        self._damage_pushes = count

    def update_weights_ipc(self, version: int, shared: list[dict]) -> SyncStats:
        """Load weights a colocated trainer packed on this GPU: ``shared`` holds one
        ``{"handles": {gpu_uuid: ipc args}, "layout": BucketLayout}`` per bucket (see
        :mod:`rayrl.cuda_transfer`). The trainer keeps the buffers alive until this returns."""
        self._check_push(version)
        start = time.perf_counter()
        nbytes = sum(b["layout"].nbytes for b in shared)
        ntensors = sum(len(b["layout"].names) for b in shared)

        def load() -> SyncStats:
            self._engine.load_weights_ipc(shared)
            return self._pushed(version, start, start, nbytes, len(shared), ntensors)

        return self._loads.load(load)

    def init_weight_broadcast(self, host: str, port: int, rank_offset: int, world_size: int) -> None:
        """Join trainer rank 0's NCCL group (split layouts); call concurrently with the trainer's
        ``init_weight_broadcast``. ``rank_offset``: this engine's first rank in the group."""
        self._engine.init_weight_broadcast(host, port, rank_offset, world_size)

    def update_weights_nccl(self, version: int) -> SyncStats:
        """Receive one broadcast push from trainer rank 0 (call concurrently with its
        ``broadcast_weights``)."""
        self._check_push(version)
        start = time.perf_counter()

        def load() -> SyncStats:
            ntensors = self._engine.receive_weight_broadcast()
            return self._pushed(version, start, start, 0, 0, ntensors)

        return self._loads.load(load)

    def sleep(self, level: int = 1) -> None:
        """Pause the engine between rollout phases.

        With GPU sleep mode (``enable_sleep_mode=True`` on CUDA) level 1 offloads weights and drops the
        KV cache, level 2 discards both. On CPU vLLM frees nothing ("sleep mode is not supported on
        CPU"); there, and for the HF backend, this is a level-0 pause: the scheduler stops, nothing is
        freed. ``generate``/``sequence_logprobs`` raise until ``wake_up``. Idempotent.
        """
        if self._asleep:
            return
        self._engine.sleep(level)
        self._asleep = True

    def wake_up(self) -> None:
        """Resume after ``sleep`` (no-op when awake). After a GPU level-2 sleep push weights before
        sampling: the engine's weights were discarded."""
        if not self._asleep:
            return
        self._engine.wake_up()
        self._asleep = False

    def shutdown(self) -> None:
        """Drop the engine/model and free its memory (the actor itself is killed by the controller)."""
        self._engine.shutdown()

    # ------------------------------------------------------------------ checks and bookkeeping

    @contextmanager
    def _engine_holding(self, min_version: int | None) -> Iterator[None]:
        """Own the engine once it holds ``min_version`` (partial rollouts: pushes arrive on their own
        thread). Without partial rollouts Ray runs a call after every push sent before it: nothing to
        wait for, and nothing could arrive while this waited."""
        if not self.partial_rollouts:
            yield
            return
        wanted = -1 if min_version is None else min_version
        with self._loads.engine_call(lambda: self._version >= wanted or self._engine.broken is not None,
                                     waiting_for=f"the push of policy version {wanted}"):
            self._check_ready()
            yield

    def _load_queued(self) -> int:
        """Between two engine steps of a generate: load the pushes that arrived; the version now held."""
        self._loads.run_queued()
        return self._version

    def _check_ready(self) -> None:
        if self._engine.broken:
            raise ActorUnusable(self._engine.broken)
        if self._asleep:
            raise RuntimeError("RolloutWorker is asleep: call wake_up() first")
        if self._engine.closed:
            raise RuntimeError("RolloutWorker was shut down")

    def _check_push(self, version: int) -> None:
        if self._engine.broken:
            raise ActorUnusable(self._engine.broken)
        if version < self._version:
            raise ValueError(f"policy version must not go backwards: {version} < {self._version}")

    def _pushed(self, version: int, start: float, fetched: float, nbytes: int, nbuckets: int, ntensors: int) -> SyncStats:
        done = time.perf_counter()
        self._version = version
        return SyncStats(version=version, seconds=done - start, fetch_seconds=fetched - start,
                         load_seconds=done - fetched, bytes=nbytes, num_buckets=nbuckets, num_tensors=ntensors)


# ---------------------------------------------------------------------- helpers


def _flip_first_byte(buckets: list[Mapping[str, np.ndarray]]) -> list[Mapping[str, np.ndarray]]:
    """A copy of ``buckets`` whose first tensor has its first byte inverted (``damage_next_pushes_for_test``)."""
    first = dict(buckets[0])
    name = next(iter(first))
    damaged = np.array(first[name], copy=True)
    damaged.view(np.uint8).reshape(-1)[0] ^= 0xFF
    first[name] = damaged
    return [first, *buckets[1:]]


def _eos_ids(model_path: str, tokenizer: Any, generation_config_cls: Any) -> list[int]:
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
