"""Building the trainable models (plain or with a peft adapter) and exporting them in HF format."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Literal

import torch

from rayrl.config import PeftConfig
from rayrl.optim import decay_param_groups

Task = Literal["causal_lm", "reward"]


def load_model(path: str, task: Task, *, attn_implementation: str, pad_token_id: int | None,
               peft: PeftConfig | None, gradient_checkpointing: bool) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification  # slow: transformers

    kwargs: dict = {"dtype": torch.float32, "attn_implementation": attn_implementation}
    if peft is not None and peft.method == "qlora":
        if not torch.cuda.is_available():
            raise RuntimeError("model.peft.method=qlora needs a CUDA GPU (bitsandbytes 4-bit)")
        from transformers import BitsAndBytesConfig  # slow: transformers

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True)
        kwargs["dtype"] = torch.bfloat16
    if task == "causal_lm":
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    else:
        # One scalar per sequence: a fresh linear head on the causal LM's final hidden state.
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, **kwargs)
        model.config.pad_token_id = pad_token_id
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if peft is not None:
        model = apply_peft(model, peft, task)
    return model


def apply_peft(model: torch.nn.Module, peft: PeftConfig, task: Task) -> torch.nn.Module:
    # slow: peft (imports transformers); only for a PEFT model
    from peft import (LoraConfig, PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model,
                      prepare_model_for_kbit_training)

    task_type = TaskType.CAUSAL_LM if task == "causal_lm" else TaskType.SEQ_CLS
    if peft.method in ("lora", "dora", "qlora"):
        if peft.method == "qlora":
            model = prepare_model_for_kbit_training(model)
        targets = peft.target_modules
        config = LoraConfig(task_type=task_type, r=peft.r, lora_alpha=peft.alpha, lora_dropout=peft.dropout,
                            target_modules=targets, use_dora=peft.method == "dora")
    elif peft.method == "prefix":
        config = PrefixTuningConfig(task_type=task_type, num_virtual_tokens=peft.num_virtual_tokens)
    else:
        config = PromptTuningConfig(task_type=task_type, num_virtual_tokens=peft.num_virtual_tokens)
    return get_peft_model(model, config)


def param_groups(model: torch.nn.Module, *, weight_decay: float, lr: float,
                 lora_plus_ratio: float | None) -> list[dict]:
    """AdamW groups: no decay on 1-D tensors; with LoRA+ the B matrices get lr x ratio."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not lora_plus_ratio:
        return decay_param_groups(named, weight_decay)
    b_matrices = [(n, p) for n, p in named if "lora_B" in n]
    others = [(n, p) for n, p in named if "lora_B" not in n]
    groups = decay_param_groups(others, weight_decay)
    groups.append({"params": [p for _, p in b_matrices], "weight_decay": weight_decay, "lr": lr * lora_plus_ratio})
    return groups


def virtual_token_count(peft: PeftConfig | None) -> int:
    """Prompt tuning prepends virtual tokens to the logits; callers cut them off."""
    return peft.num_virtual_tokens if peft is not None and peft.method == "prompt" else 0


def export_model(module: torch.nn.Module, state: dict[str, torch.Tensor], directory: str,
                 peft: PeftConfig | None) -> None:
    """Write the model in HF format (rank 0 only). With PEFT: the merged model in ``directory``
    and/or the adapter (in ``directory/adapter`` for "both", else ``directory``)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    if peft is None:
        module.save_pretrained(out, state_dict=state, safe_serialization=True)
        return
    mode = peft.export_mode
    # Load the (possibly ZeRO-gathered) weights into a CPU copy: the live training module stays intact.
    model = copy.deepcopy(module).cpu()
    model.load_state_dict(state)
    if mode in ("adapter", "both"):
        model.save_pretrained(out / "adapter" if mode == "both" else out, safe_serialization=True)
    if mode in ("merged", "both"):
        merged = model.merge_and_unload()
        merged.save_pretrained(out, safe_serialization=True)


def merged_named_weights(module: torch.nn.Module, state: dict[str, torch.Tensor], peft: PeftConfig | None,
                         device: torch.device | str = "cpu"):
    """(HF name, tensor) pairs of the full model as an inference engine loads it: with LoRA-type
    adapters merged into the base weights (the engine then needs no adapter support). With PEFT the
    merge runs on a copy of the model on ``device``."""
    if peft is None:
        return list(state.items())
    if peft.method in ("prefix", "prompt"):
        raise ValueError(f"{peft.method} tuning has no mergeable weights to sync into a rollout engine")
    model = copy.deepcopy(module).to(device)
    model.load_state_dict(state)
    return list(model.merge_and_unload().state_dict().items())


def lora_adapter(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
    """A PEFT LoRA model's adapter as its ``save_pretrained`` writes it: the adapter tensors of ``state``
    (the module's state dict, e.g. gathered under ZeRO-3) under PEFT's file names, and the
    ``adapter_config.json`` contents. What an inference engine's LoRA loader reads."""
    from peft import get_peft_model_state_dict  # slow: peft

    tensors = {name: tensor.detach().cpu().contiguous()
               for name, tensor in get_peft_model_state_dict(module, state_dict=state).items()}
    config = module.peft_config["default"].to_dict()
    for key, value in config.items():  # as save_pretrained writes it: sets as lists
        if isinstance(value, set):
            config[key] = sorted(value)
    return tensors, config
