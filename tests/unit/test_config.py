import pytest

from builtin_configs import BUILTIN_DATA, BUILTIN_MODEL, build_config
from rayrl.config import ConfigError, SFTConfig, apply_overrides, load_config


def write(tmp_path, text, builtins=True):
    """A config file; with ``builtins``, the built-in model and data are named at its end where ``text``
    has no such section (so the line numbers of ``text`` stay as they are)."""
    path = tmp_path / "run.yaml"
    if builtins:
        algorithm = text.split("algorithm:", 1)[1].split()[0] if "algorithm:" in text else "sft"
        if "\nmodel:" not in "\n" + text:
            text += f"model:\n  path: {BUILTIN_MODEL}\n"
        if "\ndata:" not in "\n" + text and algorithm in BUILTIN_DATA:
            text += f"data:\n  train: {BUILTIN_DATA[algorithm][0]}\n"
    path.write_text(text)
    return path


def test_a_run_names_its_model_and_data(tmp_path):
    """No silent demo defaults: without model.path or data.train the config is an error naming them."""
    for algorithm in ("sft", "dpo", "rm", "grpo"):
        with pytest.raises(ConfigError) as err:
            load_config(write(tmp_path, f"algorithm: {algorithm}\n", builtins=False))
        assert "key 'model': Field required" in str(err.value) and "key 'data': Field required" in str(err.value)
        config = load_config(write(tmp_path, f"algorithm: {algorithm}\n"))
        assert config.data.eval is None  # built-in eval data only where named


def test_valid_config_with_overrides(tmp_path):
    path = write(tmp_path, "algorithm: sft\ntrain:\n  lr: 1e-4\n  max_steps: 10\n")
    config = load_config(path, ["train.lr=3e-4", "output_dir=runs/x", "tracking.wandb.tags=[a, b]"])
    assert isinstance(config, SFTConfig)
    assert config.train.lr == pytest.approx(3e-4)  # "3e-4" is a float, not a string
    assert config.train.max_steps == 10
    assert config.output_dir == "runs/x"
    assert config.tracking.wandb.tags == ["a", "b"]
    assert config.train.micro_batch_size == 64  # untouched default


def test_unknown_key_names_key_suggestion_file_and_line(tmp_path):
    path = write(tmp_path, "algorithm: sft\ntrain:\n  max_steps: 3\n  lrr: 1e-4\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "unknown key 'train.lrr'" in message
    assert "did you mean 'train.lr'" in message
    assert f"{path}:4" in message


def test_unknown_key_from_command_line(tmp_path):
    path = write(tmp_path, "algorithm: sft\n")
    with pytest.raises(ConfigError, match=r"unknown key 'eval.every_stepz' \(command line\); did you mean 'eval.every_steps'"):
        load_config(path, ["eval.every_stepz=5"])


def test_wrong_type_is_not_coerced(tmp_path):
    path = write(tmp_path, 'algorithm: sft\ntrain:\n  global_batch_size: "64"\n')
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "train.global_batch_size" in str(err.value) and f"{path}:3" in str(err.value)
    with pytest.raises(ConfigError, match="data.packing"):
        load_config(write(tmp_path, "algorithm: sft\n"), ["data.packing=maybe"])


def test_non_finite_numbers_are_errors_naming_key_and_line(tmp_path):
    """train.lr=.inf once passed and exported a model of NaNs; every float of every section refuses it."""
    path = write(tmp_path, "algorithm: sft\ntrain:\n  lr: .inf\n")
    with pytest.raises(ConfigError, match=rf"key 'train.lr' \({path}:3\): Input should be a finite number"):
        load_config(path)
    grpo = write(tmp_path, "algorithm: grpo\n")
    for override, key in [("rollout.temperature=.nan", "rollout.temperature"), ("grpo.kl_coef=-.inf", "grpo.kl_coef")]:
        with pytest.raises(ConfigError, match=rf"key '{key}' \(command line\): Input should be a finite number"):
            load_config(grpo, [override])
    with pytest.raises(ConfigError, match=r"key 'rewards.0.fallback'.*: Input should be a finite number"):
        load_config(grpo, ["rewards=[{fn: math_answer, fallback: .nan}]"])


def test_contradiction_names_the_keys():
    with pytest.raises(ConfigError, match=r"train.global_batch_size \(64\) must be a multiple of train.micro_batch_size x trainer.world_size"):
        build_config({"algorithm": "sft", "train": {"global_batch_size": 64, "micro_batch_size": 48}})
    with pytest.raises(ConfigError, match="warmup_steps"):
        build_config({"algorithm": "sft", "train": {"max_steps": 5, "warmup_steps": 10}})
    with pytest.raises(ConfigError, match="data.eval and eval.generation_data are null"):
        build_config({"algorithm": "sft", "data": {"eval": None}, "eval": {"every_steps": 5}})


def test_unknown_or_missing_algorithm():
    with pytest.raises(ConfigError, match="must be one of sft"):
        build_config({"algorithm": "nope"})
    with pytest.raises(ConfigError, match="missing key 'algorithm'"):
        build_config({"train": {}})


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="not of the form key=value"):
        apply_overrides({}, ["train.lr"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_overrides({"output_dir": "x"}, ["output_dir.sub=1"])


def test_overrides_do_not_mutate_input():
    data = {"algorithm": "sft", "train": {"lr": 0.1}}
    apply_overrides(data, ["train.lr=0.2"])
    assert data["train"]["lr"] == 0.1


def test_derived_grad_accum():
    config = build_config({"algorithm": "sft", "train": {"global_batch_size": 32, "micro_batch_size": 4},
                           "trainer": {"world_size": 2}})
    assert config.grad_accum_steps == 4


def test_qlora_on_cpu_is_a_config_error():
    with pytest.raises(ConfigError, match="model.peft.method=qlora needs CUDA GPUs"):
        build_config({"algorithm": "dpo", "model": {"peft": {"method": "qlora"}}})
    # the same settings are accepted for a GPU trainer
    build_config({"algorithm": "dpo", "model": {"peft": {"method": "qlora"}}, "trainer": {"num_gpus": 1}})


def test_peft_contradictions():
    with pytest.raises(ConfigError, match="lora_plus_ratio applies to LoRA methods"):
        build_config({"algorithm": "sft", "model": {"peft": {"method": "prompt", "lora_plus_ratio": 16}}})
    with pytest.raises(ConfigError, match="no weights to merge"):
        build_config({"algorithm": "sft", "model": {"peft": {"method": "prefix", "export": "merged"}}})
    with pytest.raises(ConfigError, match="unknown key 'model.peft.rank'; valid keys here: method, r, alpha"):
        build_config({"algorithm": "sft", "model": {"peft": {"rank": 4}}})
    with pytest.raises(ConfigError, match="label_smoothing applies to loss_type"):
        build_config({"algorithm": "dpo", "dpo": {"loss_type": "ipo", "label_smoothing": 0.1}})



def test_rl_settings_that_would_train_wrongly_are_errors():
    with pytest.raises(ConfigError, match="grpo.kl_kind=k1 as a loss term has zero expected gradient"):
        build_config({"algorithm": "grpo", "grpo": {"kl_coef": 0.1, "kl_kind": "k1"}})
    build_config({"algorithm": "grpo", "grpo": {"kl_coef": 0.0, "kl_kind": "k1"}})  # no KL term: nothing to check
    ppo = {"algorithm": "ppo", "reward_model": {"path": "rm"}}
    assert build_config({**ppo, "ppo": {"kl_in": "loss"}}).ppo.kl_kind == "k3"
    assert build_config(ppo).ppo.kl_kind == "k1"  # in the reward, k1 is the per-token KL
    with pytest.raises(ConfigError, match="ppo.kl_kind=k1 as a loss term"):
        build_config({**ppo, "ppo": {"kl_in": "loss", "kl_kind": "k1"}})
    exclude = [{"fn": "math_answer", "on_failure": "exclude"}]
    assert build_config({"algorithm": "grpo", "rewards": exclude}).rewards[0].on_failure == "exclude"
    with pytest.raises(ConfigError, match=r"rewards\[0\].on_failure: exclude needs a group baseline"):
        build_config({**ppo, "rewards": exclude})
    with pytest.raises(ConfigError, match="on_failure"):
        build_config({"algorithm": "grpo", "rewards": [{"fn": "math_answer", "on_failure": "skip"}]})
    with pytest.raises(ConfigError, match="prefix/prompt tuning has none to merge"):
        build_config({"algorithm": "grpo", "model": {"peft": {"method": "prefix"}}})
    with pytest.raises(ConfigError, match=r"model.peft.dropout=0.05: .*off-policy"):
        build_config({"algorithm": "grpo", "model": {"peft": {"method": "lora", "dropout": 0.05}}})


def test_gspo_takes_the_papers_defaults_unless_set():
    gspo = build_config({"algorithm": "grpo", "grpo": {"ratio_level": "sequence"}}).grpo
    assert (gspo.eps_low, gspo.eps_high, gspo.loss_aggregation) == (3e-4, 4e-4, "seq_mean_token_mean")
    mine = build_config({"algorithm": "grpo", "grpo": {"ratio_level": "sequence", "eps_high": 1e-3}}).grpo
    assert (mine.eps_low, mine.eps_high) == (3e-4, 1e-3)
    grpo = build_config({"algorithm": "grpo"}).grpo
    assert (grpo.eps_low, grpo.eps_high, grpo.loss_aggregation) == (0.2, 0.2, "token_mean")


def test_rl_warmup_counts_optimizer_steps():
    # 10 rollout steps x 2 mini-batches x 2 epochs = 40 optimizer steps of LR schedule
    config = {"algorithm": "grpo", "train": {"max_steps": 10, "warmup_steps": 30},
              "grpo": {"mini_batches": 2, "epochs": 2}}
    assert build_config(config).schedule_steps == 40
    config["train"]["warmup_steps"] = 41
    with pytest.raises(ConfigError, match=r"exceeds the 40 optimizer steps of the run \(train.max_steps x "
                                          r"grpo.mini_batches x grpo.epochs\)"):
        build_config(config)


def test_reward_options_reach_the_function_and_default_names_clash_clearly():
    from rayrl.rewards.scoring import RewardScorer
    from rayrl.rl import reward_specs

    config = build_config({"algorithm": "grpo", "rewards": [
        {"fn": "exact_match", "name": "exact_nocase", "options": {"case_sensitive": False}},
        {"fn": "math_answer", "options": {"rel_tol": 1e-3}}]})
    result = RewardScorer(reward_specs(config)).score(["q"], ["0.3333"], [{"answer": "0.3333"}])
    assert result.per_function == {"exact_nocase": [1.0], "math_answer": [1.0]}
    result = RewardScorer(reward_specs(config)).score(["q"], ["YES"], [{"answer": "yes"}])
    assert result.per_function["exact_nocase"] == [1.0]
    with pytest.raises(ConfigError, match=r"names must be unique, got \['score', 'score'\]; set rewards\[i\].name "
                                          r"for rewards\[0\], rewards\[1\]"):
        build_config({"algorithm": "grpo", "rewards": [{"fn": "a.py:score"}, {"fn": "b.py:score"}]})


def test_async_rollout_settings_are_checked_before_anything_starts():
    from builtin_configs import build_config

    config = build_config({"algorithm": "grpo", "rollout": {"mode": "async", "max_staleness": 2}})
    assert config.rollout.mode == "async" and config.rollout.max_staleness == 2
    assert build_config({"algorithm": "grpo"}).rollout.mode == "sync"  # sync stays the default
    with pytest.raises(ConfigError, match="rollout.max_staleness.*greater than or equal to 0"):
        build_config({"algorithm": "grpo", "rollout": {"mode": "async", "max_staleness": -1}})
    with pytest.raises(ConfigError, match="async overlaps generation with training, but placement: colocated"):
        build_config({"algorithm": "grpo", "placement": "colocated", "rollout": {"mode": "async"}})
    assert build_config({"algorithm": "grpo", "rollout": {"mode": "async", "partial_rollouts": True}}
                        ).rollout.partial_rollouts
    with pytest.raises(ConfigError, match="partial_rollouts: true .* set rollout.mode: async"):
        build_config({"algorithm": "grpo", "rollout": {"partial_rollouts": True}})
    with pytest.raises(ConfigError, match="partial_rollouts: true needs rollout.backend: vllm"):
        build_config({"algorithm": "grpo", "rollout": {"mode": "async", "backend": "hf", "partial_rollouts": True}})
    with pytest.raises(ConfigError, match="partial_rollouts: true is built for rollout.weight_transport: object_store"):
        build_config({"algorithm": "grpo", "trainer": {"num_gpus": 1},
                      "rollout": {"mode": "async", "num_gpus": 1, "partial_rollouts": True}})
    with pytest.raises(ConfigError, match="rollout.mode"):
        build_config({"algorithm": "ppo", "reward_model": {"path": "rm"}, "rollout": {"mode": "overlap"}})


def test_rl_packing_settings():
    from builtin_configs import build_config

    packed = build_config({"algorithm": "grpo", "train": {"packing": True, "micro_batch_size": 4},
                           "data": {"max_prompt_length": 20}, "rollout": {"max_new_tokens": 12}})
    assert packed.max_tokens_per_micro_batch == 4 * (20 + 12)  # micro_batch_size sequences at full length
    assert build_config({"algorithm": "grpo", "train": {"packing": True, "max_tokens_per_micro_batch": 300}}
                        ).max_tokens_per_micro_batch == 300
    assert build_config({"algorithm": "grpo"}).max_tokens_per_micro_batch is None
    with pytest.raises(ConfigError, match="train.max_tokens_per_micro_batch cuts micro-batches by token count, "
                                          "which only train.packing: true does"):
        build_config({"algorithm": "grpo", "train": {"max_tokens_per_micro_batch": 300}})
    with pytest.raises(ConfigError, match=r"train.max_tokens_per_micro_batch \(100\) is under one sequence's longest "
                                          r"\(data.max_prompt_length \+ rollout.max_new_tokens = 256\)"):
        build_config({"algorithm": "ppo", "reward_model": {"path": "rm"}, "data": {"max_prompt_length": 128},
                      "rollout": {"max_new_tokens": 128}, "train": {"packing": True, "max_tokens_per_micro_batch": 100}})


def test_lora_adapter_sync_settings():
    from builtin_configs import build_config

    from rayrl.config import vllm_max_lora_rank

    lora = {"peft": {"method": "lora", "r": 8}}
    assert build_config({"algorithm": "grpo", "model": lora, "rollout": {"lora_sync": "adapter"}}).rollout.lora_sync == "adapter"
    assert build_config({"algorithm": "grpo", "model": lora}).rollout.lora_sync == "merged"
    with pytest.raises(ConfigError, match="lora_sync: adapter pushes a LoRA adapter, and model.peft.method is None"):
        build_config({"algorithm": "grpo", "rollout": {"lora_sync": "adapter"}})
    with pytest.raises(ConfigError, match="model.peft.method is 'dora'"):
        build_config({"algorithm": "grpo", "model": {"peft": {"method": "dora"}}, "rollout": {"lora_sync": "adapter"}})
    with pytest.raises(ConfigError, match="lora_sync: adapter needs rollout.backend: vllm"):
        build_config({"algorithm": "grpo", "model": lora, "rollout": {"lora_sync": "adapter", "backend": "hf"}})
    with pytest.raises(ConfigError, match="lora_sync: adapter is built for rollout.weight_transport: object_store"):
        build_config({"algorithm": "grpo", "model": lora, "trainer": {"num_gpus": 1},
                      "rollout": {"lora_sync": "adapter", "num_gpus": 1}})
    with pytest.raises(ConfigError, match="cannot swap an adapter under requests in flight"):
        build_config({"algorithm": "grpo", "model": lora,
                      "rollout": {"lora_sync": "adapter", "mode": "async", "partial_rollouts": True}})
    with pytest.raises(ConfigError, match="model.peft.r=1024: vLLM serves LoRA ranks up to 512"):
        build_config({"algorithm": "grpo", "model": {"peft": {"r": 1024}}, "rollout": {"lora_sync": "adapter"}})
    assert [vllm_max_lora_rank(r) for r in (1, 2, 8, 9, 300, 512)] == [1, 8, 8, 16, 320, 512]


def test_off_policy_correction_settings():
    from builtin_configs import build_config

    from rayrl.config import policy_settings

    settings = policy_settings(build_config({"algorithm": "grpo", "grpo": {"off_policy": "mis", "off_policy_cap": 3.0}}))
    assert (settings.off_policy, settings.off_policy_cap) == ("mis", 3.0)
    # tis_cap is off_policy: tis with that cap
    settings = policy_settings(build_config({"algorithm": "grpo", "grpo": {"tis_cap": 2.5}}))
    assert (settings.off_policy, settings.off_policy_cap) == ("tis", 2.5)
    ppo = policy_settings(build_config({"algorithm": "ppo", "reward_model": {"path": "rm"},
                                        "ppo": {"off_policy": "decoupled"}}))
    assert ppo.off_policy == "decoupled"
    with pytest.raises(ConfigError, match="tis_cap is the cap of off_policy: tis, but off_policy is 'mis'"):
        build_config({"algorithm": "grpo", "grpo": {"tis_cap": 2.0, "off_policy": "mis"}})
    with pytest.raises(ConfigError, match="off_policy_cap.*greater than 1"):
        build_config({"algorithm": "grpo", "grpo": {"off_policy": "tis", "off_policy_cap": 0.5}})
    with pytest.raises(ConfigError, match="grpo.off_policy"):
        build_config({"algorithm": "grpo", "grpo": {"off_policy": "icepop"}})
