"""One optimizer step of the loop's policy-gradient training (rl.train_on_rollout -> PolicyTrainer's loss) on a
small model in-process: the step's loss, gradient and logged stats must not depend on how its
sequences are split over ranks and micro-batches, and must be taken at the sampling temperature."""

from types import SimpleNamespace

import pytest
import torch

from rayrl.actors.policy_trainer import PolicyTrainer
from rayrl.algorithms import entropy_from_logits, token_logprobs
from rayrl.data.rollout import RolloutBatch, completion_tokens
from rayrl.objectives import PolicyGradientObjective
from rayrl.rl import MicroBatching, UpdatePlan, train_on_rollout
from rayrl.trainer_group import combine_rank_metrics

VOCAB = 11


class _Output:
    def __init__(self, logits):
        self.logits = logits


class InProcessEngine:
    """Stands in for DeepSpeed: forward, and an optimizer step that only accumulates gradients. An HF
    model gets every forward input (masks, position ids); a bare module only the ids."""

    device = torch.device("cpu")

    def __init__(self, model):
        self.model = model

    def forward(self, input_ids, use_cache=False, **inputs):
        if isinstance(self.model, torch.nn.Sequential):
            return _Output(self.model(input_ids))
        return self.model(input_ids=input_ids, use_cache=use_cache, **inputs)

    def optimizer_step(self, micro_batches, loss_fn):
        totals = {"loss": 0.0}
        for batch in micro_batches:
            loss, stats = loss_fn(batch)
            loss.backward()
            totals["loss"] += float(loss.detach())
            for key, value in stats.items():
                totals[key] = totals.get(key, 0.0) + value
        return {**totals, "grad_norm": 0.0, "lr": 0.0, "peak_rss_mb": 0.0}


class InProcessGroup:
    """``world`` policy ranks in this process over one model (their gradients add up in it)."""

    def __init__(self, model, world, packing=False):
        self.ranks = []
        for _ in range(world):
            rank = object.__new__(PolicyTrainer)
            rank.spec = SimpleNamespace(peft=None, attn_implementation="sdpa", packing=packing)
            rank.train_engine = InProcessEngine(model)
            self.ranks.append(rank)

    def start_policy_gradient_step(self, per_rank, **kwargs):
        results = [rank.train_policy_gradient_step(per_rank[i], **kwargs) for i, rank in enumerate(self.ranks)]
        return SimpleNamespace(wait=lambda: combine_rank_metrics(results))


@pytest.fixture(scope="module")
def rollout():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(VOCAB, 8), torch.nn.Linear(8, VOCAB))
    prompts = [[1, 2, 3]] * 4 + [[4, 5]] * 4
    lengths = [1, 6, 2, 9, 3, 3, 7, 1]
    completions = [torch.randint(0, VOCAB, (n,)).tolist() for n in lengths]
    tokens, _ = completion_tokens(prompts, completions, [[0.0] * n for n in lengths], 0)
    advantages = torch.tensor([1.0, -1, 0.5, -0.5, 2, -1, 0.3, -1.3])
    overlong = torch.tensor([0, 0, 0, 1, 0, 0, 1, 0], dtype=torch.bool)
    return model, tokens, advantages, overlong


def _step(rollout, world, micro, old_logps, *, overlong_filter, temperature, sampler_logps=None):
    model, tokens, advantages, overlong = rollout
    model.zero_grad()
    plan = UpdatePlan(epochs=1, mini_batches=1, sequences_per_step=8, world_size=world,
                      micro_batching=MicroBatching(micro), seed=0)
    objective = PolicyGradientObjective(overlong_filter=overlong_filter, eps_low=0.2, eps_high=0.28,
                                        temperature=temperature)
    sampler_logps = old_logps.clone() if sampler_logps is None else sampler_logps
    batch = RolloutBatch(tokens, advantages, old_logps, sampler_logps, None, overlong)
    metrics = train_on_rollout(plan, InProcessGroup(model, world), objective, batch, 0)
    grad = torch.cat([p.grad.flatten() for p in model.parameters()])
    return metrics, grad


def _model_logps_and_entropy(rollout, temperature):
    model, tokens, _, _ = rollout
    with torch.no_grad():
        logits = model(tokens.input_ids)[:, :-1]
        return (token_logprobs(logits, tokens.input_ids[:, 1:], temperature=temperature),
                entropy_from_logits(logits, temperature=temperature))


@pytest.mark.parametrize("overlong_filter", [False, True])
def test_step_is_split_invariant_and_stats_are_token_means(rollout, overlong_filter):
    _, tokens, _, overlong = rollout
    logps, entropy = _model_logps_and_entropy(rollout, 1.0)
    old = logps + 0.05 * torch.randn(generator=torch.Generator().manual_seed(1), size=logps.shape)
    mask = tokens.loss_mask[:, 1:] & ~(overlong[:, None] if overlong_filter else False)
    expected_ratio = float((torch.exp(logps - old) * mask).sum() / mask.sum())
    expected_entropy = float((entropy * mask).sum() / mask.sum())

    runs = [_step(rollout, world, micro, old, overlong_filter=overlong_filter, temperature=1.0)
            for world, micro in [(1, 8), (2, 1), (1, 2), (2, 4)]]
    for metrics, grad in runs:
        torch.testing.assert_close(grad, runs[0][1], atol=2e-7, rtol=1e-5)
        assert metrics["loss"] == pytest.approx(runs[0][0]["loss"], abs=1e-6)
        # with filtered rows the stats once summed to more than 1 share (x 8/6)
        assert metrics["ratio_mean"] == pytest.approx(expected_ratio, rel=1e-5)
        assert metrics["entropy"] == pytest.approx(expected_entropy, rel=1e-5)


def test_step_takes_log_probs_at_the_sampling_temperature(rollout):
    """The engine reports log-probs of softmax(logits / T): fed those as the old log-probs, the first
    step is exactly on-policy (ratio 1, nothing clipped) only if the trainer uses the same T."""
    logps, entropy = _model_logps_and_entropy(rollout, 0.7)
    metrics, _ = _step(rollout, 2, 2, logps, overlong_filter=False, temperature=0.7)
    assert metrics["ratio_mean"] == pytest.approx(1.0, abs=1e-6) and metrics["clip_frac"] == 0.0
    mask = rollout[1].loss_mask[:, 1:]
    assert metrics["entropy"] == pytest.approx(float((entropy * mask).sum() / mask.sum()), rel=1e-5)
    at_t1, _ = _step(rollout, 2, 2, logps, overlong_filter=False, temperature=1.0)
    assert abs(at_t1["ratio_mean"] - 1.0) > 0.05  # the check can fail


@pytest.mark.parametrize("overlong_filter", [False, True])
def test_an_on_policy_step_without_old_log_probs_equals_one_given_them(rollout, overlong_filter):
    """One optimizer step per batch: the loop passes no old log-probs and the training forward's own
    (detached) stand in. Loss, gradient and stats equal a step given the exact old log-probs, for every
    split; the sampler/trainer gap comes from the training forward."""
    _, tokens, _, overlong = rollout
    logps, _ = _model_logps_and_entropy(rollout, 0.7)
    sampler = logps + 0.05 * torch.randn(generator=torch.Generator().manual_seed(2), size=logps.shape)
    mask = tokens.loss_mask[:, 1:] & ~(overlong[:, None] if overlong_filter else False)
    expected_gap = float(((sampler - logps).abs() * mask).sum() / mask.sum())
    given, given_grad = _step(rollout, 1, 8, logps, overlong_filter=overlong_filter, temperature=0.7,
                              sampler_logps=sampler)
    assert "logprob_gap/sampler_trainer" not in given  # the loop computes it from the old log-probs
    for world, micro in [(1, 8), (2, 1), (2, 4)]:
        metrics, grad = _step(rollout, world, micro, None, overlong_filter=overlong_filter, temperature=0.7,
                              sampler_logps=sampler)
        torch.testing.assert_close(grad, given_grad, atol=2e-7, rtol=1e-5)
        for key in ("loss", "ratio_mean", "clip_frac", "entropy"):
            assert metrics[key] == pytest.approx(given[key], abs=1e-6), key
        assert metrics["ratio_mean"] == pytest.approx(1.0, abs=1e-6)
        assert metrics["logprob_gap/sampler_trainer"] == pytest.approx(expected_gap, rel=1e-5)


def test_the_separate_old_log_prob_pass_runs_only_where_it_is_needed():
    from rayrl.rl import needs_old_logprobs
    from rayrl.rl_advantages import GAEAdvantages, GroupAdvantages

    group = GroupAdvantages(group_size=4, advantage="group", scale="group")
    ppo = object.__new__(GAEAdvantages)  # the class attribute is what is asked
    plan = UpdatePlan(epochs=1, mini_batches=1, sequences_per_step=8, world_size=1, micro_batching=MicroBatching(8),
                      seed=0)
    assert not needs_old_logprobs(plan, group)
    assert needs_old_logprobs(plan, ppo)  # PPO's KL-penalised rewards read them before the update
    assert needs_old_logprobs(UpdatePlan(2, 1, 8, 1, MicroBatching(8), 0), group)
    assert needs_old_logprobs(UpdatePlan(1, 2, 4, 1, MicroBatching(4), 0), group)
