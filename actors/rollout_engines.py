"""The two rollout backends behind one interface, :class:`RolloutEngine`: ``VLLMEngine`` and ``HFEngine``.

:class:`rayrl.actors.rollout_worker.RolloutWorker` holds one engine and delegates sampling, scoring,
weight loading and sleep to it; policy versions, push checks and ``SyncStats`` stay in the worker.
This module also defines what both backends speak: :class:`SamplingSettings` and :class:`Completion`.

Backends
--------
``VLLMEngine``: a ``vllm.LLM`` engine *inside this process* (``VLLM_ENABLE_V1_MULTIPROCESSING=0``). In a
Ray actor that is what we want: init drops from ~15 s to ~2-3 s, and weight buckets reach the model by
reference (``collective_rpc`` with tensor arguments does not survive the multiprocess engine's msgpack
transport). ``enforce_eager`` (no compile/graph capture), a bounded KV cache (``kv_cache_gib``, passed
as vLLM's ``kv_cache_memory_bytes``), and the engine seed. vLLM-CPU pins its OpenMP threads to the
allowed cores (``VLLM_CPU_OMP_THREADS_BIND``, default ``auto``; set it through the actor's
``runtime_env`` to pin elsewhere) and disables ``torch.set_num_threads`` for the whole process.

``HFEngine``: Hugging Face ``generate`` as a fallback, with the same outputs, including per-token
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

Weights swapped under requests in flight (``rollout.partial_rollouts``)
---------------------------------------------------------------------
``VLLMEngine.generate`` with a ``between_steps`` hook drives the engine one step at a time and calls the
hook between steps; a hook that loads new weights returns the new version. The reload then preempts
every running request (vLLM's ``reset_prefix_cache(reset_running_requests=True)``): the KV cache of the
tokens so far is recomputed by the new weights before the next token, so each token's log-prob is the
exact one of the version that sampled it, given the whole prefix (not a mix of old KV and new weights).
Each completion records where a version took over (``Completion.version_changes``).
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
import torch

from rayrl.config import vllm_max_lora_rank
from rayrl.cuda_transfer import broadcast_buckets, nccl_communicator, open_ipc, unpack_bucket
from rayrl.remote import ActorUnusable

if TYPE_CHECKING:
    from transformers import GenerationConfig, PreTrainedTokenizerBase

LogprobsMode = Literal["processed", "raw"]
FinishReason = Literal["stop", "length"]
# (name, tensor) pairs of one weight bucket, Hugging Face parameter names.
NamedTensors = Sequence[tuple[str, torch.Tensor]]

# Called between two engine steps of a generate call; returns the policy version the engine holds after it.
BetweenSteps = Callable[[], int]

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

    ``policy_version`` is the version that started it. ``version_changes`` lists ``(token index,
    version)`` where new weights took over mid-way (partial rollouts): tokens from that index on were
    sampled by that version. Empty: every token is ``policy_version``'s.
    """

    prompt_index: int
    sample_index: int
    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: FinishReason
    policy_version: int
    version_changes: list[tuple[int, int]] = field(default_factory=list)

    def token_versions(self) -> list[int]:
        """The policy version that sampled each token."""
        versions, version = [], self.policy_version
        changes = iter(self.version_changes)
        change = next(changes, None)
        for k in range(len(self.token_ids)):
            while change is not None and change[0] <= k:
                version = change[1]
                change = next(changes, None)
            versions.append(version)
        return versions


class RolloutEngine(Protocol):
    """What ``RolloutWorker`` needs from a backend. Inputs arrive validated (non-empty int prompts,
    prompt lengths in range); the worker checks readiness and versions before calling."""

    @property
    def broken(self) -> str | None:
        """Why the engine's weights are unusable (a push failed mid-way), or None."""

    @property
    def closed(self) -> bool:
        """Whether ``shutdown`` dropped the model."""

    def generate(self, prompts: list[list[int]], sampling: SamplingSettings, policy_version: int,
                 between_steps: BetweenSteps | None = None) -> list[Completion]:
        """Prompt-major completions, each stamped with ``policy_version``. ``between_steps`` (vLLM only):
        called between engine steps, may load new weights (see the module doc)."""

    def sequence_logprobs(self, token_ids: Sequence[Sequence[int]], prompt_lens: Sequence[int]) -> list[list[float]]:
        """Raw (T=1) log-probs of ``seq[prompt_len:]`` for each sequence."""

    def load_weights(self, buckets: Sequence[NamedTensors]) -> None:
        """Load buckets of ``(hf_name, tensor)`` pairs (any subset of the model)."""

    def load_adapter(self, tensors: Mapping[str, torch.Tensor], adapter_config: Mapping[str, Any]) -> None:
        """Serve this LoRA adapter (PEFT's file names and config) over the base weights from now on."""

    def load_weights_ipc(self, shared: Sequence[Mapping[str, Any]]) -> None:
        """Load buckets a colocated trainer packed on this GPU (``{"handles", "layout"}`` each)."""

    def init_weight_broadcast(self, host: str, port: int, rank_offset: int, world_size: int) -> None:
        """Join trainer rank 0's NCCL group."""

    def receive_weight_broadcast(self) -> int:
        """Receive and load one broadcast push; returns the number of tensors loaded."""

    def sleep(self, level: int) -> None:
        """Pause (and, where supported, offload/discard at ``level``)."""

    def wake_up(self) -> None:
        """Resume after ``sleep``."""

    def shutdown(self) -> None:
        """Drop the model and free its memory."""


# ---------------------------------------------------------------------- vLLM


def all_linear_modules(model_path: str) -> list[str]:
    """The names of a causal LM's linear layers but its output head (what PEFT's "all-linear" targets),
    read from a copy of the architecture on the meta device (no weights are loaded)."""
    from transformers import AutoConfig, AutoModelForCausalLM  # slow: transformers

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
    head = model.get_output_embeddings()
    return sorted({name.rpartition(".")[2] for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear) and module is not head})


class VLLMEngine:
    """A ``vllm.LLM`` in this process (see the module doc); weights reload layerwise through
    :class:`rayrl.vllm_ext.WeightSyncExtension`."""

    def __init__(
        self,
        model_path: str,
        eos_token_ids: Sequence[int],
        *,
        dtype: str,
        seed: int,
        kv_cache_gib: float | None,
        max_model_len: int | None,
        logprobs_mode: LogprobsMode,
        enable_prefix_caching: bool,
        enable_sleep_mode: bool,
        extra_engine_args: Mapping[str, Any],
        lora_rank: int | None = None,
        lora_target_modules: Sequence[str] | None = None,
    ) -> None:
        """``lora_rank``: serve a LoRA adapter of up to this rank over the base weights (``load_adapter``), on
        the modules ``lora_target_modules`` (None: every linear layer but the output head, as PEFT's
        "all-linear")."""
        # Must be set before vLLM reads its environment (the import below is the first in this process
        # when running as a Ray actor). In-process engine: tensors in collective_rpc pass by reference.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if kv_cache_gib is not None:
            os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
        # Lazy: vllm is optional (the cpu/vllm extras) and slow to import; the HF backend never needs it.
        from vllm import LLM
        from vllm.platforms import current_platform

        self.logprobs_mode: LogprobsMode = logprobs_mode
        self.broken: str | None = None
        self._eos_token_ids = list(eos_token_ids)
        self._sleep_supported = enable_sleep_mode and current_platform.is_sleep_mode_available()
        self._sleep_level: int | None = None
        self._stepping = False  # inside a stepwise generate: a reload preempts the running requests
        self._request_ids = itertools.count()
        self._lora: Any = None  # the LoRARequest of the adapter served, once one is loaded
        self._adapter_dir: str | None = None
        kwargs: dict[str, Any] = dict(
            model=model_path,
            dtype=dtype,
            seed=seed,
            enforce_eager=True,
            logprobs_mode=_VLLM_LOGPROBS_MODE[logprobs_mode],
            worker_extension_cls="rayrl.vllm_ext.WeightSyncExtension",
            enable_prefix_caching=enable_prefix_caching,
        )
        if kv_cache_gib is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * (1 << 30))
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        if not current_platform.is_cpu():  # sleep mode is GPU-only
            kwargs["enable_sleep_mode"] = self._sleep_supported
        if lora_rank is not None:
            # The targets, named: left to vLLM, the output head would be wrapped too, and vLLM's LoRA logits
            # path fails on prompt log-probs (the sync guard's probe), vllm-project/vllm#29955.
            targets = list(lora_target_modules) if lora_target_modules is not None else all_linear_modules(model_path)
            kwargs.update(enable_lora=True, max_lora_rank=vllm_max_lora_rank(lora_rank), max_loras=1,
                          lora_target_modules=targets)
        kwargs.update(extra_engine_args)
        self._llm: Any = LLM(**kwargs)

    @property
    def closed(self) -> bool:
        return self._llm is None

    def generate(self, prompts: list[list[int]], sampling: SamplingSettings, policy_version: int,
                 between_steps: BetweenSteps | None = None) -> list[Completion]:
        from vllm import SamplingParams  # lazy: optional, slow dependency (see __init__)
        from vllm.inputs import TokensPrompt  # lazy: optional, slow dependency

        self._check_logprobs_mode(sampling)
        if between_steps is not None:
            return self._generate_stepwise(prompts, sampling, policy_version, between_steps)
        stop_ids = sorted(set(self._eos_token_ids) | set(sampling.stop_token_ids))
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
        outputs = self._llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False,
                                     lora_request=self._lora)
        completions = []
        for i, (prompt, out) in enumerate(zip(prompts, outputs)):
            samples = sorted(out.outputs, key=lambda o: o.index)
            if len(samples) != reps:
                raise RuntimeError(f"vLLM returned {len(samples)} samples for prompt {i}, expected {reps}")
            completions += [_vllm_completion(i, j, prompt, samples[j % reps], policy_version)
                             for j in range(sampling.n)]
        return completions

    def _generate_stepwise(self, prompts: list[list[int]], sampling: SamplingSettings, policy_version: int,
                           between_steps: BetweenSteps) -> list[Completion]:
        """``generate`` one engine step at a time, with ``between_steps`` run before each step."""
        from vllm import SamplingParams  # lazy: optional, slow dependency (see __init__)
        from vllm.inputs import TokensPrompt  # lazy: optional, slow dependency
        from vllm.sampling_params import RequestOutputKind  # lazy: optional, slow dependency

        engine = self._llm.llm_engine
        stop_ids = sorted(set(self._eos_token_ids) | set(sampling.stop_token_ids))
        reps = 1 if sampling.greedy else sampling.n
        # One request per sample, seeded as vLLM seeds child j of an n-sample request (seed + j): each
        # sample's tokens so far are visible after every step (CUMULATIVE outputs).
        samples: dict[str, tuple[int, int]] = {}
        for i, prompt in enumerate(prompts):
            seed = None if sampling.seed is None else _request_seed(sampling.seed, sampling.seed_offset + i)
            for j in range(reps):
                params = SamplingParams(
                    n=1, temperature=sampling.temperature, top_p=sampling.top_p,
                    top_k=sampling.top_k if sampling.top_k > 0 else 0, max_tokens=sampling.max_new_tokens,
                    stop=list(sampling.stop) or None, stop_token_ids=stop_ids,
                    seed=None if seed is None else seed + j, logprobs=0, output_kind=RequestOutputKind.CUMULATIVE)
                request_id = f"rayrl-{next(self._request_ids)}"
                engine.add_request(request_id, TokensPrompt(prompt_token_ids=prompt), params, lora_request=self._lora)
                samples[request_id] = (i, j)
        latest: dict[str, Any] = {}  # request id -> its cumulative output after the last step
        finished: set[str] = set()
        changes: dict[str, list[tuple[int, int]]] = {request_id: [] for request_id in samples}
        version = policy_version
        self._stepping = True
        try:
            while engine.has_unfinished_requests():
                now = between_steps()
                if self.broken:
                    raise ActorUnusable(self.broken)
                if now != version:
                    version = now
                    for request_id in samples.keys() - finished:
                        done = len(latest[request_id].token_ids) if request_id in latest else 0
                        changes[request_id].append((done, version))
                for out in engine.step():
                    latest[out.request_id] = out.outputs[0]
                    if out.finished:
                        finished.add(out.request_id)
        except BaseException:
            unfinished = list(samples.keys() - finished)
            if unfinished and self._llm is not None:
                with contextlib.suppress(Exception):
                    engine.abort_request(unfinished)
            raise
        finally:
            self._stepping = False
        by_sample = {samples[request_id]: request_id for request_id in samples}
        completions = []
        for i, prompt in enumerate(prompts):
            for j in range(sampling.n):
                request_id = by_sample[(i, j % reps)]
                if request_id not in finished:
                    raise RuntimeError(f"vLLM did not finish the request of prompt {i}, sample {j}")
                sample = latest[request_id]
                completions.append(_vllm_completion(
                    i, j, prompt, sample, policy_version,
                    [c for c in changes[request_id] if c[0] < len(sample.token_ids)]))
        return completions

    def sequence_logprobs(self, token_ids: Sequence[Sequence[int]], prompt_lens: Sequence[int]) -> list[list[float]]:
        from vllm import SamplingParams  # lazy: optional, slow dependency (see __init__)
        from vllm.inputs import TokensPrompt  # lazy: optional, slow dependency

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        outputs = self._llm.generate([TokensPrompt(prompt_token_ids=list(map(int, s))) for s in token_ids],
                                     params, use_tqdm=False, lora_request=self._lora)
        result = []
        for seq, plen, out in zip(token_ids, prompt_lens, outputs):
            # prompt_logprobs[0] is None (nothing predicts the first token); entry k scores seq[k].
            result.append([_logprob_of(out.prompt_logprobs[k], int(seq[k])) for k in range(plen, len(seq))])
        return result

    def load_weights(self, buckets: Sequence[NamedTensors]) -> None:
        self._reload([("rayrl_load_weights", (list(pairs),)) for pairs in buckets])

    def load_adapter(self, tensors: Mapping[str, torch.Tensor], adapter_config: Mapping[str, Any]) -> None:
        """Serve the LoRA adapter ``tensors`` (PEFT's file names) with ``adapter_config`` from now on, over
        the base weights, replacing the one served. vLLM loads adapters from a directory: it is written
        to a fresh one, which replaces the last."""
        from safetensors.torch import save_file  # lazy: with vllm (see __init__)
        from vllm.lora.request import LoRARequest  # lazy: optional, slow dependency

        if self._stepping:
            raise RuntimeError("an adapter cannot replace the one served under requests in flight")
        directory = tempfile.mkdtemp(prefix="rayrl-adapter-")
        try:
            save_file(dict(tensors), os.path.join(directory, "adapter_model.safetensors"))
            with open(os.path.join(directory, "adapter_config.json"), "w") as f:
                json.dump(dict(adapter_config), f)
            # One id, reloaded in place: the engine holds one adapter, the policy's current one.
            request = LoRARequest("policy", 1, directory, load_inplace=True)
            if not self._llm.llm_engine.add_lora(request):
                raise RuntimeError(f"vLLM did not load the pushed LoRA adapter from {directory}")
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        if self._adapter_dir is not None:
            shutil.rmtree(self._adapter_dir, ignore_errors=True)
        self._adapter_dir, self._lora = directory, request
        # The prefix cache keys blocks by adapter id, which stays: the old adapter's blocks must go.
        self._llm.reset_prefix_cache()

    def load_weights_ipc(self, shared: Sequence[Mapping[str, Any]]) -> None:
        # The extension opens the handles inside vLLM's worker, next to the model.
        self._reload([("rayrl_load_ipc_bucket", (b["handles"], b["layout"])) for b in shared])

    def init_weight_broadcast(self, host: str, port: int, rank_offset: int, world_size: int) -> None:
        self._llm.collective_rpc("rayrl_init_nccl", args=(host, port, rank_offset, world_size))

    def receive_weight_broadcast(self) -> int:
        return self._reload([("rayrl_receive_nccl", ())])[0]

    def sleep(self, level: int) -> None:
        # Without GPU sleep mode (always on CPU) only the scheduler pauses: level 0.
        effective = level if self._sleep_supported else 0
        if self._llm is not None:
            self._llm.sleep(level=effective)
        self._sleep_level = effective

    def wake_up(self) -> None:
        if self._llm is not None:
            self._llm.wake_up(tags=["scheduling"] if self._sleep_level == 0 else None)
        self._sleep_level = None

    def shutdown(self) -> None:
        self._llm = None
        if self._adapter_dir is not None:
            shutil.rmtree(self._adapter_dir, ignore_errors=True)
        gc.collect()
        try:
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory  # lazy: optional dependency

            cleanup_dist_env_and_memory()
        except Exception:  # best effort: the process is about to go away anyway
            pass

    def _check_logprobs_mode(self, sampling: SamplingSettings) -> None:
        if sampling.logprobs_mode != self.logprobs_mode and not sampling.modes_coincide:
            raise ValueError(
                f"this vLLM engine was built with logprobs_mode={self.logprobs_mode!r} (an engine-level "
                f"setting); {sampling.logprobs_mode!r} log-probs at T={sampling.temperature}, "
                f"top_k={sampling.top_k}, top_p={sampling.top_p} differ. Build another worker.")

    def _reload(self, loads: list[tuple[str, tuple]]) -> list[int]:
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
            self.broken = (f"RolloutWorker: a weight push failed mid-way ({exc!r}); "
                           "the engine's weights are inconsistent, recreate the worker")
            with contextlib.suppress(Exception):
                llm.collective_rpc("rayrl_finish_weight_update")
            raise
        llm.collective_rpc("rayrl_finish_weight_update")
        # Prefix-cache trap: cached KV blocks were computed by the old weights. Mid-generate (partial
        # rollouts) the running requests' blocks are dropped too: they are recomputed by the new weights.
        llm.reset_prefix_cache(reset_running_requests=self._stepping)
        return counts


# ---------------------------------------------------------------------- Hugging Face


class HFEngine:
    """Hugging Face ``generate`` on the model (CPU, or the current CUDA device when there is one).

    ``model`` is public: a colocated check may read its ``state_dict()`` directly.
    """

    def __init__(
        self,
        model_path: str,
        tokenizer: PreTrainedTokenizerBase,
        pad_token_id: int,
        eos_token_ids: Sequence[int],
        *,
        dtype: str,
        seed: int,
        num_threads: int | None,
        batch_size: int,
    ) -> None:
        from transformers import AutoModelForCausalLM  # slow: transformers' model classes

        if num_threads is not None:
            torch.set_num_threads(num_threads)
        torch.manual_seed(seed)
        device = "cpu" if not torch.cuda.is_available() else "cuda"
        self.model: Any = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype)).to(device)
        self.model.eval()
        # Never set (as before this split): an HF push that raises mid-way keeps the tensors it copied.
        self.broken: str | None = None
        self._device = torch.device(device)
        self._tokenizer = tokenizer
        self._pad_token_id = pad_token_id
        self._eos_token_ids = list(eos_token_ids)
        self._batch_size = batch_size
        self._broadcast: Any = None  # NCCL communicator from trainer rank 0 (GPU)

    @property
    def closed(self) -> bool:
        return self.model is None

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], sampling: SamplingSettings, policy_version: int,
                 between_steps: BetweenSteps | None = None) -> list[Completion]:
        from transformers import GenerationConfig  # slow: transformers

        if between_steps is not None:
            raise ValueError("the hf backend cannot load weights under a generate call in flight "
                             "(rollout.partial_rollouts needs rollout.backend: vllm)")

        stop_ids = sorted(set(self._eos_token_ids) | set(sampling.stop_token_ids))
        raw = sampling.logprobs_mode == "raw"
        # Greedy: HF refuses num_return_sequences > 1; decode once, replicate (vLLM's n greedy
        # samples are identical too).
        warpers = {} if sampling.greedy else dict(
            # Explicit "off" values: unset fields fall back to transformers' defaults (top_k=50).
            temperature=sampling.temperature, top_k=max(sampling.top_k, 0), top_p=sampling.top_p)
        config = GenerationConfig(
            do_sample=not sampling.greedy, max_new_tokens=sampling.max_new_tokens,
            num_return_sequences=1 if sampling.greedy else sampling.n,
            eos_token_id=stop_ids, pad_token_id=self._pad_token_id,
            output_scores=not raw, output_logits=raw, return_dict_in_generate=True, **warpers,
        )
        completions: list[Completion] = []
        rng = torch.random.fork_rng(devices=[]) if sampling.seed is not None else contextlib.nullcontext()
        with rng:
            if sampling.seed is not None:
                torch.manual_seed(_request_seed(sampling.seed, sampling.seed_offset))
            for start in range(0, len(prompts), self._batch_size):
                chunk = prompts[start:start + self._batch_size]
                completions += self._generate_chunk(chunk, start, sampling, config, stop_ids, raw, policy_version)
        return completions

    def _generate_chunk(self, prompts: list[list[int]], offset: int, sampling: SamplingSettings,
                        config: GenerationConfig, stop_ids: list[int], raw: bool,
                        policy_version: int) -> list[Completion]:
        width = max(len(p) for p in prompts)
        # Left padding: every row's next token is at the same column.
        input_ids = torch.tensor([[self._pad_token_id] * (width - len(p)) + p for p in prompts], device=self._device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self._device)
        out = self.model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config)
        new_tokens = out.sequences[:, width:].tolist()
        # The scores are the very logits the sampler drew from (after temperature/top-k/top-p), so
        # these are exact processed log-probs, not a recomputation.
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
            text = self._tokenizer.decode(body, skip_special_tokens=True)
            if sampling.stop:
                cut = _cut_at_stop_string(self._tokenizer, body, sampling.stop)
                if cut is not None:
                    k, text = cut
                    tokens, lps, finish = tokens[:k], lps[:k], "stop"
            for j in range(j, j + sampling.n - reps + 1):  # one pass, or n copies of the greedy decode
                completions.append(Completion(
                    prompt_index=offset + i, sample_index=j, prompt_ids=prompts[i], token_ids=list(tokens),
                    logprobs=list(lps), text=text, finish_reason=finish, policy_version=policy_version,
                ))
        return completions

    @torch.no_grad()
    def sequence_logprobs(self, token_ids: Sequence[Sequence[int]], prompt_lens: Sequence[int]) -> list[list[float]]:
        width = max(len(s) for s in token_ids)
        # Right padding is harmless for a causal model: real positions never attend to later pads.
        ids = torch.tensor([list(s) + [self._pad_token_id] * (width - len(s)) for s in token_ids], device=self._device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in token_ids], device=self._device)
        logits = self.model(input_ids=ids, attention_mask=mask).logits.float()
        lp = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        return [lp[r, plen - 1:len(s) - 1].tolist() for r, (s, plen) in enumerate(zip(token_ids, prompt_lens))]

    def load_weights(self, buckets: Iterable[NamedTensors]) -> None:
        self._load(buckets)

    def load_adapter(self, tensors: Mapping[str, torch.Tensor], adapter_config: Mapping[str, Any]) -> None:
        raise NotImplementedError("the hf backend serves merged weights only (rollout.lora_sync: merged)")

    def load_weights_ipc(self, shared: Sequence[Mapping[str, Any]]) -> None:
        self._load(unpack_bucket(open_ipc(b["handles"]), b["layout"]) for b in shared)
        torch.cuda.synchronize()

    def init_weight_broadcast(self, host: str, port: int, rank_offset: int, world_size: int) -> None:
        self._broadcast = nccl_communicator(host, port, rank_offset, world_size, torch.cuda.current_device())

    def receive_weight_broadcast(self) -> int:
        received = list(broadcast_buckets(self._broadcast, None, None))
        self._load(pairs for pairs, _ in received)
        return sum(len(pairs) for pairs, _ in received)

    def sleep(self, level: int) -> None:
        pass  # nothing to free or pause: the worker refuses calls until wake_up

    def wake_up(self) -> None:
        pass

    def shutdown(self) -> None:
        self.model = None
        gc.collect()

    @torch.no_grad()
    def _load(self, buckets: Iterable[NamedTensors]) -> None:
        # state_dict() tensors share storage with the parameters: copy_ updates the model in place
        # (and casts). Tied weights appear under both names; either name updates both.
        state = self.model.state_dict()
        for pairs in buckets:
            for name, tensor in pairs:
                if name not in state:
                    raise KeyError(f"update_weights: unknown parameter {name!r}")
                state[name].copy_(tensor)


# ---------------------------------------------------------------------- helpers


def _request_seed(seed: int, prompt_index: int) -> int:
    return int(np.random.SeedSequence([seed, prompt_index]).generate_state(1, np.uint32)[0] >> 1)


def _logprob_of(position: Any, token_id: int) -> float:
    """The log-prob of ``token_id`` at one position of a vLLM logprobs list (dict or flat view)."""
    return float(position[token_id].logprob)


def _vllm_completion(prompt_index: int, sample_index: int, prompt: list[int], sample: Any, policy_version: int,
                     version_changes: list[tuple[int, int]] | None = None) -> Completion:
    """A ``Completion`` of one finished vLLM sample (a ``CompletionOutput``)."""
    if sample.finish_reason not in ("stop", "length"):
        raise RuntimeError(f"vLLM finished a request with {sample.finish_reason!r}")
    token_ids = list(sample.token_ids)
    return Completion(prompt_index=prompt_index, sample_index=sample_index, prompt_ids=prompt, token_ids=token_ids,
                      logprobs=_sampled_logprobs(sample.logprobs, token_ids), text=sample.text,
                      finish_reason=sample.finish_reason, policy_version=policy_version,
                      version_changes=list(version_changes or []))


def _sampled_logprobs(logprobs: Any, token_ids: list[int]) -> list[float]:
    if logprobs is None or len(logprobs) != len(token_ids):
        raise RuntimeError("vLLM returned no per-token logprobs for a completion")
    return [_logprob_of(pos, t) for pos, t in zip(logprobs, token_ids)]


def _cut_at_stop_string(tokenizer: PreTrainedTokenizerBase, tokens: list[int],
                        stops: Sequence[str]) -> tuple[int, str] | None:
    """vLLM's stop-string rule for the HF backend: stop at the first token whose decoded prefix
    contains a stop string; keep tokens up to and including it; text up to the stop string."""
    for k in range(1, len(tokens) + 1):
        text = tokenizer.decode(tokens[:k], skip_special_tokens=True)
        hits = [text.find(s) for s in stops if s and s in text]
        if hits:
            return k, text[:min(hits)]
    return None
