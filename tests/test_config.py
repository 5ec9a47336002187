from pathlib import Path

import pytest
from pydantic import ValidationError

from fedllm.config import ConfigError, RunConfig, load_config, parse_set_options


def test_defaults_are_valid_and_private():
    cfg = load_config()
    assert cfg.privacy.enabled and cfg.privacy.target_epsilon == 8.0
    assert cfg.model.task == "seq-cls" and cfg.federation.num_nodes == 3
    assert Path(cfg.data.resolved_train_paths()[0]).is_file()
    assert Path(cfg.data.resolved_eval_path()).is_file()


def test_toml_file_and_overrides(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('seed = 7\n[federation]\nrounds = 5\n[lora]\nr = 4\n'
                 'target_modules = ["query", "key"]\n')
    cfg = load_config(f, parse_set_options(["federation.rounds=2", "train.learning_rate=0.01"]))
    assert (cfg.seed, cfg.federation.rounds, cfg.lora.r) == (7, 2, 4)
    assert cfg.lora.target_modules == ("query", "key")
    assert cfg.train.learning_rate == 0.01


def test_config_is_frozen():
    cfg = RunConfig()
    with pytest.raises(ValidationError):
        cfg.seed = 3  # type: ignore[misc]


@pytest.mark.parametrize("overrides, needle", [
    ({"federation.rounds": 0}, "federation.rounds"),
    ({"privacy.delta": 2.0}, "privacy.delta"),
    ({"model.task": "translation"}, "model.task"),
    ({"lora.rank": 4}, "lora.rank: unknown field"),
    ({"federation.nodes_per_round": 5}, "nodes_per_round (5) exceeds"),
    ({"partition.scheme": "files"}, "one data.train_paths entry per node"),
    ({"train.physical_batch_size": 512}, "physical_batch_size"),
    ({"train.local_steps": 0}, "train.local_steps"),
])
def test_invalid_values_name_the_field(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert needle in str(e.value)


def test_dp_off_must_be_explicit():
    with pytest.raises(ConfigError, match="allow_no_dp"):
        load_config(None, {"privacy.enabled": False})
    cfg = load_config(None, {"privacy.enabled": False, "privacy.allow_no_dp": True})
    assert not cfg.privacy.enabled


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[federation\nrounds = 2")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_set_option_syntax():
    assert parse_set_options(["a.b=1", "c='x'", "d=true", "e=[1,2]", "f=word"]) == {
        "a.b": 1, "c": "x", "d": True, "e": [1, 2], "f": "word"}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_set_options(["novalue"])


def test_node_config_loads_and_names_bad_fields(tmp_path):
    from fedllm.config import load_node_config

    p = tmp_path / "node.toml"
    p.write_text('[node]\nname = "hospital-a"\n[data]\npath = "train.csv"\n'
                 '[privacy]\nmax_epsilon = 3.0\n')
    cfg = load_node_config(p)
    assert cfg.node.name == "hospital-a" and cfg.privacy.max_epsilon == 3.0
    assert cfg.privacy.allow_no_dp is False
    p.write_text('[node]\nname = "bad name!"\n[data]\npath = "x"\n[privacy]\nmax_epsilon = -1\n')
    with pytest.raises(ConfigError) as e:
        load_node_config(p)
    assert "node.name" in str(e.value) and "privacy.max_epsilon" in str(e.value)
    with pytest.raises(ConfigError, match="not found"):
        load_node_config(tmp_path / "missing.toml")


def test_node_data_protection_sections(tmp_path):
    from fedllm.config import load_node_config

    base = '[node]\nname = "acme"\n[data]\npath = "d.tsv"\n'
    p = tmp_path / "node.toml"
    p.write_text(base, encoding="utf-8")
    cfg = load_node_config(p)
    # deployed nodes redact every entity type by default; no cap, no user column
    assert cfg.redaction.enabled and "email" in cfg.redaction.entities
    assert cfg.contribution.max_examples_per_user == 0 and cfg.node.key_file is None
    assert not RunConfig().redaction.enabled  # simulations: opt-in (public demo data)
    p.write_text(base + "[contribution]\nmax_examples_per_user = 20\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="needs data.user_column"):
        load_node_config(p)
    p.write_text(base + '[redaction]\nentities = ["email", "ssn"]\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"redaction\.entities\.1"):
        load_node_config(p)
    with pytest.raises(ConfigError, match="needs data.user_column"):
        load_config(None, {"data.max_examples_per_user": 5})


def test_feature_centring_is_on_for_dp_classification_only():
    cfg = load_config(None, {})
    assert cfg.centers_features and cfg.center_prior() == ((4.0, 1.0, 1),)
    assert cfg.train.head_init == "class-means"
    no_dp = load_config(None, {"privacy.enabled": False, "privacy.allow_no_dp": True})
    central = load_config(None, {"central_dp.enabled": True})
    lm = load_config(None, {"model.task": "causal-lm"})
    off = load_config(None, {"train.center_features": "off"})
    for c in (no_dp, central, lm, off):
        assert not c.centers_features and c.center_prior() == ()
    for over, needle in (
            ({"privacy.enabled": False, "privacy.allow_no_dp": True}, "privacy.enabled"),
            ({"model.task": "causal-lm"}, "seq-cls heads only"),
            ({"central_dp.enabled": True}, "central_dp.enabled")):
        with pytest.raises(ConfigError, match=needle):
            load_config(None, {**over, "train.center_features": "on"})
    with pytest.raises(ConfigError, match="center_noise_multiplier"):
        load_config(None, {"privacy.center_noise_multiplier": 0})
    assert load_config(None, {"train.head_init": "random"}).train.head_init == "random"
    with pytest.raises(ConfigError, match="head_init"):
        load_config(None, {"train.head_init": "lda"})


def test_bf16_precision_under_dp_needs_fp32_clip_norms():
    assert load_config(None, {}).train.precision == "auto"
    assert load_config(None, {}).model.base_dtype == "fp32"  # bf16 base: opt-in
    assert load_config(None, {"model.base_dtype": "bf16"}).model.base_dtype == "bf16"
    with pytest.raises(ConfigError, match="base_dtype"):
        load_config(None, {"model.base_dtype": "fp16"})
    for clipping in ("auto", "linear-hooks"):
        cfg = load_config(None, {"train.precision": "bf16", "train.clipping": clipping})
        assert cfg.train.precision == "bf16"
    for clipping in ("hooks", "ghost"):
        with pytest.raises(ConfigError, match=f"bf16.*not '{clipping}'"):
            load_config(None, {"train.precision": "bf16", "train.clipping": clipping})
    no_dp = load_config(None, {"train.precision": "bf16", "train.clipping": "hooks",
                               "privacy.enabled": False, "privacy.allow_no_dp": True})
    assert no_dp.train.precision == "bf16"
    with pytest.raises(ConfigError, match="precision"):
        load_config(None, {"train.precision": "fp16"})


def test_grouped_clipping_is_opt_in_for_heads_and_needs_per_sample_gradients():
    from fedllm.train import dp_for_run

    flat = load_config(None, {})
    assert flat.privacy.clip_groups == "flat" and not flat.grouped_clipping
    assert dp_for_run(flat, noise_multiplier=1.0).lora_max_grad_norm is None
    cfg = load_config(None, {"privacy.clip_groups": "head-lora"})
    dp = dp_for_run(cfg, noise_multiplier=1.2)
    assert (dp.noise_multiplier, dp.max_grad_norm, dp.lora_max_grad_norm,
            dp.lora_noise_share) == (1.2, 1.0, 0.1, 0.5)
    with pytest.raises(ConfigError, match="needs a classification head"):
        load_config(None, {"privacy.clip_groups": "head-lora", "model.task": "causal-lm"})
    with pytest.raises(ConfigError, match="not 'ghost'"):
        load_config(None, {"privacy.clip_groups": "head-lora", "train.clipping": "ghost"})
    assert load_config(None, {"train.clipping": "ghost"}).train.clipping == "ghost"
    for bad in ({"privacy.lora_max_grad_norm": 0}, {"privacy.lora_noise_share": 1},
                {"privacy.clip_groups": "per-layer"}):
        with pytest.raises(ConfigError, match="lora_|clip_groups"):
            load_config(None, bad)


def test_a_learning_rate_of_zero_freezes_its_part_but_something_must_train():
    assert load_config(None, {}).train.trained_parts("seq-cls") == ("lora", "head")
    assert load_config(None, {}).train.trained_parts("causal-lm") == ("lora",)
    head_only = load_config(None, {"train.learning_rate": 0}).train
    assert head_only.learning_rate == 0 and head_only.trained_parts("seq-cls") == ("head",)
    lora_only = load_config(None, {"train.head_learning_rate": 0}).train
    assert lora_only.head_learning_rate == 0 and lora_only.trained_parts("seq-cls") == ("lora",)
    with pytest.raises(ConfigError, match="nothing would be trained"):
        load_config(None, {"train.learning_rate": 0, "train.head_learning_rate": 0})
    with pytest.raises(ConfigError, match="nothing would be trained"):
        load_config(None, {"train.learning_rate": 0, "train.head_learning_rate": None})
    with pytest.raises(ConfigError, match="no head to train"):
        load_config(None, {"train.learning_rate": 0, "model.task": "causal-lm"})
    with pytest.raises(ConfigError, match="use 'flat'"):
        load_config(None, {"train.learning_rate": 0, "privacy.clip_groups": "head-lora"})
    with pytest.raises(ConfigError, match="learning_rate"):
        load_config(None, {"train.learning_rate": -1e-3})


def test_the_dry_run_plan_says_what_trains_and_for_how_many_steps():
    """fedllm run --dry-run's plan (fedllm.cli.run.print_plan), in-process."""
    import io
    import json

    from rich.console import Console

    from fedllm.cli.run import print_plan

    def plan(overrides, *, as_json):
        out = io.StringIO()
        cfg = load_config(None, {"federation.rounds": 2} | overrides)
        console = Console(file=out, width=200)
        if as_json:
            import contextlib

            with contextlib.redirect_stdout(out):
                print_plan(console, cfg, [60, 60], as_json=True, classes=2)
            return json.loads(out.getvalue())
        print_plan(console, cfg, [60, 60], as_json=False, classes=2)
        return out.getvalue()

    default = plan({}, as_json=True)
    assert default["trains"] == ["lora", "head"] and default["lora_a_frozen"] is False
    assert [n["steps_per_round"] for n in default["nodes"]] == [1, 1]  # batch 256 > 60
    stepped = plan({"train.local_steps": 3, "train.batch_size": 20}, as_json=True)
    assert [n["steps_per_round"] for n in stepped["nodes"]] == [3, 3]
    assert "trains: the classification head alone" in plan({"train.learning_rate": 0},
                                                          as_json=False)
    assert "trains: LoRA alone" in plan({"train.head_learning_rate": 0}, as_json=False)
    assert "trains:" not in plan({}, as_json=False)
    assert "B matrices only" in plan({"lora.freeze_a": True}, as_json=False)
    assert "B matrices" not in plan({"lora.freeze_a": True, "train.learning_rate": 0},
                                    as_json=False)
    # The server optimizer is in the plan, and said when it is not plain FedAvg.
    assert default["server_optimizer"]["kind"] == "fedavg"
    assert "server optimizer" not in plan({}, as_json=False)
    adam = {"server_optimizer.kind": "fedadam", "server_optimizer.learning_rate": 0.01}
    assert "server optimizer fedadam, learning rate 0.01" in plan(adam, as_json=False)
    assert plan(adam, as_json=True)["server_optimizer"]["learning_rate"] == 0.01
    with pytest.raises(ConfigError, match="server_optimizer"):
        load_config(None, {"server_optimizer.kind": "fedyogi"})
    with pytest.raises(ConfigError, match="server_optimizer"):
        load_config(None, {"server_optimizer.beta1": 1.0})
    # The moving average of the global adapter: said in the plan, not a server_step argument.
    ema = {"server_optimizer.ema_decay": 0.9}
    assert "output: a moving average of the global adapter over rounds (decay 0.9)" in plan(
        ema, as_json=False)
    assert plan(ema, as_json=True)["server_optimizer"]["ema_decay"] == 0.9
    assert "ema_decay" not in load_config(None, ema).server_optimizer.step_arguments()
    with pytest.raises(ConfigError, match="server_optimizer"):
        load_config(None, {"server_optimizer.ema_decay": 1.0})
    # A decaying rate is in the plan and said; a constant one is not.
    assert default["lr_schedule"] == {"kind": "constant", "min_fraction": 0.0}
    assert "learning rate:" not in plan({}, as_json=False)
    cos = {"train.lr_schedule": "cosine", "train.lr_min_fraction": 0.1}
    assert ("learning rate: cosine over 2 rounds, from 0.01 (head 0.1) to 0.1 x that"
            in plan(cos, as_json=False))
    with pytest.raises(ConfigError, match="lr_schedule"):
        load_config(None, {"train.lr_schedule": "step"})
    with pytest.raises(ConfigError, match="lr_min_fraction"):
        load_config(None, {"train.lr_min_fraction": 1.5})
    # Logit adjustment: off by default; said, with where each node's prior comes from.
    assert default["logit_adjustment"] == 0.0 and "logit-adjusted" not in plan({}, as_json=False)
    assert ("adding 1 x log(its label prior) to its logits in training (prior from its noisy "
            "counts in the class-statistics release)"
            in plan({"train.logit_adjustment": 1.0}, as_json=False))
    no_dp = {"privacy.enabled": False, "privacy.allow_no_dp": True, "train.logit_adjustment": 1}
    assert "(prior from its own label counts)" in plan(no_dp, as_json=False)


def test_logit_adjustment_needs_a_head_and_under_dp_the_release():
    for over, needle in (
            ({"model.task": "causal-lm"}, "seq-cls heads only"),
            ({"train.center_features": "off"}, "class-statistics release"),
            ({"central_dp.enabled": True}, "class-statistics release")):
        with pytest.raises(ConfigError, match=needle):
            load_config(None, {**over, "train.logit_adjustment": 1.0})
    with pytest.raises(ConfigError, match="logit_adjustment"):
        load_config(None, {"train.logit_adjustment": -1.0})
    assert load_config(None, {"privacy.enabled": False, "privacy.allow_no_dp": True,
                              "train.center_features": "off", "train.logit_adjustment": 0.5}
                       ).train.logit_adjustment == 0.5


def test_a_sampling_rate_gives_uneven_nodes_the_same_q_and_sigma():
    """train.sample_rate: each node's logical batch is q × its examples, so its DP plan (the
    dry run's, the node's own) has the same q and σ whatever its size; exclusive with
    train.batch_size, and the run's config dict parses back."""
    import contextlib
    import io
    import json

    from rich.console import Console

    from fedllm.cli.run import print_plan
    from fedllm.config import RunConfig

    def plan_nodes(cfg, sizes):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            print_plan(Console(file=io.StringIO()), cfg, sizes, as_json=True, classes=2)
        return json.loads(out.getvalue())["nodes"]

    cfg = load_config(None, {"train.sample_rate": 0.1, "federation.num_nodes": 3,
                             "federation.rounds": 2, "privacy.accountant": "rdp"})
    assert [cfg.train.batch_for(n) for n in (3000, 240, 4, 0)] == [300, 24, 1, 1]
    assert RunConfig.model_validate(cfg.to_dict()) == cfg
    assert "batch_size" not in cfg.to_dict()["train"]
    nodes = plan_nodes(cfg, [3000, 240, 60])
    assert [n["expected_batch"] for n in nodes] == [300, 24, 6]
    assert {n["sample_rate"] for n in nodes} == {0.1}
    assert len({round(n["noise_multiplier"], 9) for n in nodes}) == 1
    assert [n["steps_per_round"] for n in nodes] == [10, 10, 10]
    # The fixed batch gives the small node a larger q and so a larger σ.
    fixed = load_config(None, {"train.batch_size": 24, "federation.rounds": 2,
                               "privacy.accountant": "rdp"})
    big, small = plan_nodes(fixed, [3000, 240])
    assert small["sample_rate"] == 0.1 and big["sample_rate"] == 1 / 125
    with pytest.raises(ConfigError, match="sample_rate .* and train.batch_size .* both set"):
        load_config(None, {"train.sample_rate": 0.1, "train.batch_size": 64})
    with pytest.raises(ConfigError, match="sample_rate"):
        load_config(None, {"train.sample_rate": 1.5})
