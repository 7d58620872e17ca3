import torch

from rayrl.config import build_config
from rayrl.rewards.scoring import ScoreResult
from rayrl.rl import compute_advantages, merge_scores, zero_variance_groups, _slice_scores


def test_advantage_choices():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    group = compute_advantages(rewards, 4, build_config({"algorithm": "grpo"}))
    assert torch.allclose(group.view(2, 4).sum(-1), torch.zeros(2), atol=1e-6)
    assert torch.all(group[4:] == 0)  # a group of equal rewards learns nothing
    rloo = compute_advantages(rewards, 4, build_config({"algorithm": "grpo", "grpo": {"advantage": "rloo"}}))
    assert torch.allclose(rloo[:4], torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3]))
    rpp = compute_advantages(rewards, 4, build_config({"algorithm": "grpo", "grpo": {"advantage": "reinforce_pp"}}))
    assert abs(float(rpp.mean())) < 1e-6 and rpp[4] > 0  # whitened over the whole batch, not per group


def test_zero_variance_groups():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5])
    assert zero_variance_groups(rewards, 2).tolist() == [True, False, True]


def test_scores_slice_and_merge_keep_failures():
    scores = ScoreResult(total=[1.0, 0.0, 0.0, 1.0], per_function={"f": [1.0, 0.0, 0.0, 1.0]},
                         failures={"f": 2}, timeouts={"f": 0}, failed={"f": [False, True, True, False]})
    parts = [_slice_scores(scores, 0, 2), _slice_scores(scores, 2, 4)]
    assert parts[0].failures == {"f": 1}
    merged = merge_scores(parts)
    assert merged.total == scores.total and merged.failures == {"f": 2}
    assert merged.metrics()["reward/f/failure_rate"] == 0.5
