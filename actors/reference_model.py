"""ReferenceModel: frozen log-probs of the starting policy, for the KL term of RL losses.

With a peft adapter on the policy no ReferenceModel is needed: the policy trainer computes reference
log-probs with its adapter disabled (no second copy of the weights).
"""

from __future__ import annotations

import torch

from rayrl.algorithms import token_logprobs
from rayrl.data.batch import TokenBatch
from rayrl.data.packing import forward_maybe_packed


class ReferenceModel:
    def __init__(self, model_path: str, *, num_threads: int = 1, attn_implementation: str = "sdpa",
                 packing: bool = False):
        """``packing``: each micro-batch's rows are packed for the forward (``rayrl.data.packing``)."""
        from transformers import AutoModelForCausalLM  # slow: transformers; the driver imports this module

        torch.set_num_threads(max(1, num_threads))
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32,
                                                          attn_implementation=attn_implementation)
        self.model.to(self.device).eval().requires_grad_(False)
        self.packing = packing

    @torch.no_grad()
    def token_logprobs(self, micro_batches: list[TokenBatch], temperature: float = 1.0) -> list[torch.Tensor]:
        """Per micro-batch, (B, T-1) log-probs of each next token under ``softmax(logits / temperature)``."""
        def logprobs(forward: TokenBatch) -> tuple[torch.Tensor]:
            inputs = forward.model_inputs(self.device)
            logits = self.model(**inputs).logits
            return (token_logprobs(logits[:, :-1], inputs["input_ids"][:, 1:], temperature=temperature),)

        return [forward_maybe_packed(batch, self.packing, logprobs)[0].cpu() for batch in micro_batches]
