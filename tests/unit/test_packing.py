"""RL packing (train.packing): rows packed for the forward give the padded forward's log-probs, values,
losses and gradients; token-budget micro-batches cover every sequence once, within budget, balanced."""

from types import SimpleNamespace

import pytest
import torch
from test_rl_train_step import InProcessEngine, InProcessGroup

from rayrl.actors.critic import Critic, load_value_model
from rayrl.actors.policy_trainer import PolicyTrainer
from rayrl.actors.reference_model import ReferenceModel
from rayrl.data.packing import RowPacking, balanced_micro_batches
from rayrl.data.rollout import RolloutBatch, completion_tokens
from rayrl.objectives import PolicyGradientObjective
from rayrl.rl import MicroBatching, UpdatePlan, train_on_rollout

PROMPT_LENGTHS = [5, 3, 7, 4, 6, 3, 5, 8, 2, 4]
COMPLETION_LENGTHS = [1, 17, 4, 30, 2, 9, 25, 3, 12, 6]


@pytest.fixture(scope="module")
def rollout(tiny_model_dir):
    """Prompts and completions of mixed lengths (the case packing is for), with advantages."""
    generator = torch.Generator().manual_seed(0)
    draw = lambda n: torch.randint(5, 100, (n,), generator=generator).tolist()  # noqa: E731
    prompts = [draw(n) for n in PROMPT_LENGTHS]
    completions = [draw(n) for n in COMPLETION_LENGTHS]
    tokens, sampler = completion_tokens(prompts, completions, [[0.0] * len(c) for c in completions], pad_id=0)
    advantages = torch.randn(len(prompts), generator=generator)
    return tokens, sampler, advantages


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")


def test_packed_rows_are_no_longer_than_the_longest_and_unpack_to_each_row():
    completions = [[3] * 6, [4], [5, 6, 6], [7] * 2]
    tokens, _ = completion_tokens([[1, 2]] * 4, completions, [[0.0] * len(c) for c in completions], 0)
    packing = RowPacking.of(tokens)
    # lengths 8, 3, 5, 4 in rows of at most the longest (8), first fit decreasing: 8 | 5+3 | 4
    assert packing.packed.input_ids.shape == (3, 8)
    assert packing.packed.segment_ids.tolist() == [[1] * 8, [1] * 3 + [2] * 5, [1] * 4 + [0] * 4]
    assert packing.packed.is_packed
    # The packed forward's "next token" at each position, put back, is each row's own next token.
    next_tokens = packing.unpack(packing.packed.input_ids[:, 1:].float())
    real = tokens.segment_ids[:, 1:] > 0
    torch.testing.assert_close(next_tokens[real], tokens.input_ids[:, 1:][real].float())
    assert (next_tokens[~real] == 0).all()


def test_token_budget_micro_batches_cover_every_sequence_once_within_budget_and_balanced():
    lengths = [60, 7, 33, 12, 64, 5, 41, 18, 9, 27, 50, 3, 22, 15]
    for world, budget in [(1, 64), (2, 64), (2, 128), (3, 100), (4, 400)]:
        ranks = balanced_micro_batches(lengths, world, budget)
        assert len(ranks) == world and len({len(rank) for rank in ranks}) == 1
        seen = sorted(i for rank in ranks for micro in rank for i in micro)
        assert seen == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in micro) <= budget for rank in ranks for micro in rank)
        totals = [sum(lengths[i] for micro in rank for i in micro) for rank in ranks]
        assert max(totals) - min(totals) <= max(lengths)  # the ranks finish together
    # More micro-batches than sequences: the spare ones are empty, every rank still has as many.
    assert balanced_micro_batches([10, 10, 10], 2, 10) == [[[0], [2]], [[1], []]]
    with pytest.raises(ValueError, match="65 tokens is over the micro-batch budget of 64"):
        balanced_micro_batches([65, 3], 1, 64)


def _policy_rank(model, packing):
    rank = object.__new__(PolicyTrainer)
    rank.spec = SimpleNamespace(peft=None, attn_implementation="sdpa", packing=packing)
    rank.train_engine = InProcessEngine(model)
    return rank


def _eval_engine(engine):
    engine.engine = SimpleNamespace(eval=lambda: None)
    return engine


def test_packed_log_prob_and_value_passes_equal_the_padded_ones(rollout, model, tiny_model_dir):
    tokens, _, _ = rollout
    mask = tokens.segment_ids[:, 1:] > 0
    micro = [tokens.select(slice(0, 6)).trimmed(tokens.select(slice(0, 6)).width), tokens.select(slice(6, 10))]
    value_model = load_value_model(tiny_model_dir).eval()  # one model: its head is freshly initialised
    results = {}
    for packing in (False, True):
        rank = _policy_rank(model, packing)
        _eval_engine(rank.train_engine)
        policy = rank.token_logprobs(micro, temperature=0.7)
        reference = object.__new__(ReferenceModel)
        reference.model, reference.device, reference.packing = model, torch.device("cpu"), packing
        critic = object.__new__(Critic)
        critic.spec = SimpleNamespace(packing=packing)
        critic.train_engine = _eval_engine(InProcessEngine(value_model))
        results[packing] = (policy, reference.token_logprobs(micro, temperature=0.7), critic.values(micro))
    for padded, packed in zip(results[False], results[True]):
        for a, b, batch in zip(padded, packed, micro):
            real = batch.segment_ids[:, 1:] > 0
            torch.testing.assert_close(b[real], a[real], atol=2e-5, rtol=1e-5)
    assert mask.sum() > 0


@pytest.mark.parametrize("world, micro, budget", [(1, 10, 60), (2, 5, 45), (2, 1, 38), (1, 2, 400)])
@pytest.mark.parametrize("given_old, aggregation", [(False, "token_mean"), (True, "seq_mean_token_mean")])
def test_a_packed_step_has_the_padded_steps_loss_gradient_and_stats(rollout, model, world, micro, budget, given_old,
                                                                      aggregation):
    tokens, sampler, advantages = rollout
    with torch.no_grad():
        logits = model(**tokens.model_inputs(torch.device("cpu"))).logits[:, :-1]
        logps = torch.log_softmax(logits / 0.7, -1).gather(-1, tokens.input_ids[:, 1:, None]).squeeze(-1)
    noise = lambda seed: 0.05 * torch.randn(logps.shape, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    old = logps + noise(1) if given_old else None
    batch = RolloutBatch(tokens, advantages, old, logps + noise(2), logps + noise(3),
                         torch.zeros(len(advantages), dtype=torch.bool))
    objective = PolicyGradientObjective(temperature=0.7, kl_coef=0.05, aggregation=aggregation, off_policy="tis")

    def step(micro_batching, packing):
        model.zero_grad()
        plan = UpdatePlan(epochs=1, mini_batches=1, sequences_per_step=len(advantages), world_size=world,
                          micro_batching=micro_batching, seed=0)
        metrics = train_on_rollout(plan, InProcessGroup(model, world, packing=packing), objective, batch, 0)
        return metrics, torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    padded, padded_grad = step(MicroBatching(micro), packing=False)
    packed, packed_grad = step(MicroBatching(micro, max_tokens=budget), packing=True)
    torch.testing.assert_close(packed_grad, padded_grad, atol=1e-6, rtol=1e-4)
    for key in ("loss", "ratio_mean", "clip_frac", "entropy", "kl"):
        if key in padded:
            assert packed[key] == pytest.approx(padded[key], abs=1e-6, rel=1e-5), key
