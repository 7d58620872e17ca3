import pytest
import torch

from builtin_configs import build_config
from rayrl.config import policy_settings
from rayrl.rewards.scoring import ScoreResult
from rayrl.rl_sampling import sample_step, zero_variance_groups
from rayrl.rl_advantages import sequence_advantages


def test_advantage_choices():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    mask = torch.ones(8, 3, dtype=torch.bool)

    def advantages(**grpo):
        config = build_config({"algorithm": "grpo", "grpo": grpo})
        return sequence_advantages(rewards, 4, mask, advantage=config.grpo.advantage, scale=config.grpo.scale)

    group = advantages()
    assert torch.allclose(group.view(2, 4).sum(-1), torch.zeros(2), atol=1e-6)
    assert torch.all(group[4:] == 0)  # a group of equal rewards learns nothing
    assert torch.allclose(advantages(advantage="rloo")[:4], torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3]))
    rpp = advantages(advantage="reinforce_pp")
    assert rpp.shape == (8, 3) and abs(float(rpp.mean())) < 1e-6
    assert (rpp[4] > 0).all()  # whitened over the whole batch, not per group: the all-correct group is pushed up
    baseline = advantages(advantage="reinforce_pp_baseline")
    assert torch.all(baseline[4:] == 0) and (baseline[0] > 0).all() and (baseline[1] < 0).all()


def test_reinforce_pp_whitens_over_tokens_not_sequences():
    """Scores [1, 0, 0, 0] on completions of 1, 9, 1 and 1 tokens: 12 tokens, one of them scored 1, so
    mean 1/12 and (unbiased) variance 1/12; the correct completion's token gets (11/12) / sqrt(1/12)."""
    lengths = torch.tensor([1, 9, 1, 1])
    mask = torch.arange(9)[None, :] < lengths[:, None]
    adv = sequence_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), 4, mask, advantage="reinforce_pp", scale="group")
    std = (1 / 12) ** 0.5
    assert float(adv[0, 0]) == pytest.approx((11 / 12) / std, rel=1e-5)  # 3.175; per-sequence whitening gave 1.5
    assert torch.allclose(adv[1:][mask[1:]], torch.full((11,), -(1 / 12) / std), rtol=1e-5)
    assert torch.all(adv[~mask] == 0)


def test_zero_variance_groups():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5])
    assert zero_variance_groups(rewards, 2).tolist() == [True, False, True]
    # excluded completions do not count: a group whose valid rewards agree has no signal
    three = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 2.0])
    valid = torch.tensor([True, False, True, True, True, False])
    assert zero_variance_groups(three, 3, valid).tolist() == [True, False]


def test_scores_slice_and_merge_keep_failures():
    scores = ScoreResult(total=[1.0, 0.0, 0.0, 1.0], per_function={"f": [1.0, 0.0, 0.0, 1.0]},
                         failures={"f": 2}, timeouts={"f": 0}, failed={"f": [False, True, True, False]})
    parts = [scores.slice(0, 2), scores.slice(2, 4)]
    assert parts[0].failures == {"f": 1}
    merged = ScoreResult.concat(parts)
    assert merged.total == scores.total and merged.failures == {"f": 2}
    assert merged.metrics()["reward/f/failure_rate"] == 0.5


def _dynamic_sampling_setup(num_prompts):
    """Prompt i: rewards all 0 (i % 3 == 0), all 1 (i % 3 == 1) or mixed (i % 3 == 2) within its group."""
    from types import SimpleNamespace

    from rayrl.actors.rollout_worker import Completion, SamplingSettings
    from rayrl.data.rollout import PromptRow

    group = 4
    prompts = [PromptRow(f"p{i}", [i + 1], {"kind": i % 3}) for i in range(num_prompts)]

    class Pool:
        def __init__(self):
            self.calls = []

        def generate_scored(self, ids, sampling, rows, score):  # RolloutPool's, without workers
            from rayrl.rl_roles import ScoredRound

            self.calls.append(len(ids))
            completions = [Completion(i, k, p, [5, 6], [-1.0, -1.0], "x", "stop", 0)
                           for i, p in enumerate(ids) for k in range(sampling.n)]
            return ScoredRound(completions, score(rows, completions), 0.0, 0.0)

    def score(rows, completions):
        total = [float(r.fields["kind"] == 1) if r.fields["kind"] != 2 else float(c.sample_index % 2)
                 for r, c in zip(rows, completions)]
        return ScoreResult(total=total, per_function={"f": total}, failures={"f": 0}, timeouts={"f": 0},
                           failed={"f": [False] * len(total)})

    settings = SimpleNamespace(prompts_per_step=6, dynamic_sampling=True, max_sampling_rounds=5)
    return settings, prompts, Pool(), score, SamplingSettings(n=group)


def test_dynamic_sampling_refills_with_fresh_prompts():
    settings, prompts, pool, score, sampling = _dynamic_sampling_setup(30)
    rollout, stats, _ = sample_step(settings, 4, 0, 0, prompts[:6], prompts, pool, score, sampling)
    names = [rollout.prompts[i * 4].prompt for i in range(6)]
    assert len(set(names)) == 6 and all(int(n[1:]) % 3 == 2 for n in names)  # no duplicates, all informative
    assert not zero_variance_groups(rollout.rewards, 4).any()
    assert stats["groups/unfilled"] == 0 and stats["groups/zero_variance_frac"] == pytest.approx(4 / 6)
    assert pool.calls[1] > 4  # the refill oversamples: only a third of the groups are kept


def test_dynamic_sampling_on_a_small_dataset_stops_when_no_prompt_is_left():
    settings, prompts, pool, score, sampling = _dynamic_sampling_setup(7)
    rollout, stats, _ = sample_step(settings, 4, 0, 0, prompts[:6], prompts, pool, score, sampling)
    assert pool.calls == [6, 1]  # one prompt left to draw, then nothing: no error
    assert stats["groups/unfilled"] == 4  # p2, p5 kept; the step is topped up with zero-variance groups
    assert len(rollout.completions) == 6 * 4


def test_excluded_completions_reach_the_advantages_through_sample_step():
    """A reward with on_failure: exclude: the step's Rollout marks the completion invalid, and the group
    estimator leaves it out (advantage 0) while its group-mates are normalised among themselves."""
    from types import SimpleNamespace

    from rayrl.rl_advantages import GroupAdvantages

    _, prompts, pool, _, sampling = _dynamic_sampling_setup(2)

    def score(rows, completions):  # sample 3 of every group has no score
        total = [float(c.sample_index % 2) for c in completions]
        return ScoreResult(total=total, per_function={"f": total}, failures={"f": 0}, timeouts={"f": 0},
                           failed={"f": [False] * 8}, excluded=[c.sample_index == 3 for c in completions])

    settings = SimpleNamespace(prompts_per_step=2, dynamic_sampling=False, max_sampling_rounds=1)
    rollout, _, _ = sample_step(settings, 4, 0, 0, prompts, prompts, pool, score, sampling)
    assert rollout.valid.tolist() == [True, True, True, False] * 2
    tokens, _ = rollout.token_batch(pad_id=0)
    estimated = GroupAdvantages(group_size=4, advantage="group", scale="group").estimate(
        rollout.rewards, tokens, None, None, rollout.valid)
    # valid rewards [0, 1, 0]: mean 1/3, std sqrt(1/3)
    expected = torch.tensor([-1 / 3, 2 / 3, -1 / 3, 0.0]) / (1 / 3) ** 0.5
    torch.testing.assert_close(estimated.advantages, torch.cat([expected, expected]), atol=1e-5, rtol=0)


def test_accuracy_counts_positive_first_verifier_rewards():
    from rayrl.rl import accuracy

    scores = ScoreResult(total=[1.5, 0.2, 0.0, -1.0], per_function={"correct": [1.0, 0.2, 0.0, -1.0], "fmt": [0.5] * 4},
                         failures={}, timeouts={}, failed={})
    assert accuracy(scores) == 0.5
    rm_only = ScoreResult(total=[0.3], per_function={"reward_model": [0.3]}, failures={}, timeouts={}, failed={})
    assert accuracy(rm_only) is None


def test_overlong_penalty_is_one_more_reward():
    from rayrl.actors.rollout_worker import Completion
    from rayrl.rl import with_overlong_penalty

    def score(rows, completions):
        n = len(completions)
        return ScoreResult(total=[1.0] * n, per_function={"correct": [1.0] * n}, failures={"correct": 0},
                           timeouts={"correct": 0}, failed={"correct": [False] * n})

    config = build_config({"algorithm": "grpo", "rollout": {"max_new_tokens": 8},
                           "grpo": {"overlong_buffer": 4, "overlong_penalty_factor": 0.5}})
    completions = [Completion(0, k, [1], [5] * length, [0.0] * length, "x", "stop", 0)
                   for k, length in enumerate([2, 4, 6, 8])]
    result = with_overlong_penalty(score, policy_settings(config), 8)(["p"] * 4, completions)
    assert result.per_function["overlong_penalty"] == [0.0, 0.0, -0.25, -0.5]
    assert result.total == [1.0, 1.0, 0.75, 0.5]
    assert list(result.per_function)[0] == "correct"  # accuracy still reads the verifier
    off = build_config({"algorithm": "grpo"})
    assert with_overlong_penalty(score, policy_settings(off), 8) is score
    with pytest.raises(Exception, match=r"grpo.overlong_buffer \(9\) exceeds rollout.max_new_tokens \(8\)"):
        build_config({"algorithm": "grpo", "rollout": {"max_new_tokens": 8}, "grpo": {"overlong_buffer": 9}})


def test_timeouts_reach_the_step_metrics():
    """Rates are over everything scored; the kept groups' metrics must not overwrite them with 0."""
    from rayrl.rl import rollout_metrics

    settings, prompts, pool, _, sampling = _dynamic_sampling_setup(30)
    settings.dynamic_sampling = False

    def timed_out(rows, completions):
        n = len(completions)
        return ScoreResult(total=[0.0] * n, per_function={"f": [0.0] * n}, failures={"f": n}, timeouts={"f": n},
                           failed={"f": [True] * n})

    rollout, stats, _ = sample_step(settings, 4, 0, 0, prompts[:6], prompts, pool, timed_out, sampling)
    assert stats["reward/f/timeout_rate"] == 1.0 and stats["reward/f/failure_rate"] == 1.0
    tokens, sampler = rollout.token_batch(0)
    step = rollout_metrics(rollout, sampler, sampler, tokens.loss_mask[:, 1:])
    assert {**step, **stats}["reward/f/timeout_rate"] == 1.0
    assert not any(k.endswith("_rate") for k in step)


def test_long_prompts_are_an_error_naming_the_line_or_skipped(tmp_path, tokenizer):
    import json

    from rayrl.data.rollout import load_prompts
    from rayrl.data.loading import DataError

    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "answer": "1"}) + "\n" for p in ["1+0=", "1+2+3+4+5+6+7=", "0+1="]))
    with pytest.raises(DataError, match=r"prompts.jsonl:2: prompt is \d+ tokens, over data.max_prompt_length \(6\); "
                                        r".*data.drop_long_prompts"):
        load_prompts(str(data), tokenizer, 6)
    kept = load_prompts(str(data), tokenizer, 6, drop_long=True)
    assert [p.prompt for p in kept] == ["1+0=", "0+1="]
    with pytest.raises(DataError, match="every prompt is over"):
        load_prompts(str(data), tokenizer, 2, drop_long=True)


def test_sequences_longer_than_the_models_positions_are_a_config_error(tiny_model_dir):
    from rayrl.config import ConfigError
    from rayrl.rl import check_context_length

    ok = build_config({"algorithm": "grpo", "data": {"max_prompt_length": 500}, "rollout": {"max_new_tokens": 12}})
    check_context_length(ok, tiny_model_dir)  # 512 positions
    long = build_config({"algorithm": "grpo", "data": {"max_prompt_length": 500}, "rollout": {"max_new_tokens": 13}})
    with pytest.raises(ConfigError, match=r"= 513 tokens, over the model's max_position_embeddings \(512"):
        check_context_length(long, tiny_model_dir)


def test_a_reward_failing_on_every_item_of_the_first_batch_stops_the_run():
    from rayrl.rl import BrokenRewardError, stop_on_broken_rewards

    config = build_config({"algorithm": "grpo", "rewards": [{"fn": "math_answer", "name": "correct"},
                                                            {"fn": "exact_match", "name": "exact"}]})
    def failing(rows, completions):
        n = len(completions)
        return ScoreResult(total=[0.0] * n, per_function={"correct": [0.0] * n, "exact": [0.0] * n},
                           failures={"correct": n, "exact": 1}, timeouts={"correct": 0, "exact": 0},
                           failed={"correct": [True] * n, "exact": [True] + [False] * (n - 1)},
                           errors={"correct": ["ValueError: math_answer needs an 'answer' field in the dataset row"]})
    score = stop_on_broken_rewards(failing, config)
    with pytest.raises(BrokenRewardError, match=r"rewards\[0\] \(math_answer\) failed on all 3 items.*'answer' field"):
        score([None] * 3, [None] * 3)
    assert score([None] * 3, [None] * 3).failures["correct"] == 3  # later batches are counted, not fatal
    allowed = build_config({"algorithm": "grpo", "rewards": [{"fn": "math_answer", "name": "correct",
                                                              "allow_all_failures": True},
                                                             {"fn": "exact_match", "name": "exact"}]})
    assert stop_on_broken_rewards(failing, allowed)([None] * 3, [None] * 3).failures["correct"] == 3
