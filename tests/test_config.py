"""Tests for moe_dist.config: loading, overrides, coercion, and every rule of validate()/validate_moe().

Every error is a ConfigError (a ValueError) whose message names the field, the bad value and the fix;
the tests match on all three where the message has them.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from moe_dist import config as C
from moe_dist.config import (Config, ConfigError, MoEConfig, apply_overrides, from_dict, load, to_dict, validate,
                             validate_moe)

REPO = Path(__file__).resolve().parents[1]
PRESETS = sorted((REPO / "configs").glob("*.yaml"))


def _cfg(**sections) -> Config:
    """A default Config with some sections' fields replaced: _cfg(moe={"top_k": 3})."""
    cfg = Config()
    for name, values in sections.items():
        setattr(cfg, name, dataclasses.replace(getattr(cfg, name), **values))
    return cfg


def _bad(match: str, **sections) -> None:
    with pytest.raises(ValueError, match=match) as info:
        validate(_cfg(**sections))
    assert isinstance(info.value, ConfigError)


def test_config_error_is_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


def test_defaults_validate() -> None:
    validate(Config())
    validate_moe(MoEConfig())


# ---------------------------------------------------------------------------------------------- from_dict

def test_unknown_section_suggests_close_name() -> None:
    with pytest.raises(ValueError, match=r"unknown config section 'mo'; did you mean 'moe'\?"):
        from_dict({"mo": {"top_k": 1}})


def test_unknown_section_without_close_name_lists_known() -> None:
    with pytest.raises(ValueError, match=r"unknown config section 'zzzzzz'; known: checkpoint, data, model, moe, parallel, train"):
        from_dict({"zzzzzz": {}})


def test_unknown_key_suggests_close_name() -> None:
    with pytest.raises(ValueError, match=r"unknown field in 'moe' 'topk'; did you mean 'top_k'\?"):
        from_dict({"moe": {"topk": 2}})


def test_unknown_key_without_close_name_lists_known() -> None:
    with pytest.raises(ValueError, match=r"unknown field in 'data' 'qqqqqqqq'; known: path, val_fraction"):
        from_dict({"data": {"qqqqqqqq": 1}})


def test_from_dict_none_and_empty_give_defaults() -> None:
    assert from_dict(None) == Config()
    assert from_dict({}) == Config()
    assert from_dict({"moe": None}) == Config()      # an empty YAML section `moe:` loads as None


def test_from_dict_non_mapping_names_sections() -> None:
    with pytest.raises(ValueError, match=r"a config must be a mapping of sections \(model, moe, parallel, train, "
                                         r"data, checkpoint\), got list"):
        from_dict([1, 2])


def test_from_dict_sets_fields_and_keeps_other_defaults() -> None:
    cfg = from_dict({"moe": {"top_k": 1, "num_experts": 16}, "train": {"steps": 7}})
    assert cfg.moe.top_k == 1 and cfg.moe.num_experts == 16 and cfg.train.steps == 7
    assert cfg.moe.expert_hidden == MoEConfig().expert_hidden and cfg.model == Config().model


@pytest.mark.parametrize("section_value", [3, "top_k", [1, 2]])
def test_from_dict_non_mapping_section_is_config_error(section_value) -> None:
    with pytest.raises(ValueError, match=r"moe"):
        from_dict({"moe": section_value})


# ------------------------------------------------------------------------------------------------ coercion

def test_bad_literal_lists_choices() -> None:
    with pytest.raises(ValueError, match=r"moe\.score_func='tanh' is not allowed; choose one of 'softmax', 'sigmoid'"):
        from_dict({"moe": {"score_func": "tanh"}})


@pytest.mark.parametrize("field,value", [("activation", "relu"), ("drop_policy", "random"),
                                         ("aux_loss_type", "token"), ("backend", "cuda")])
def test_other_bad_literals(field, value) -> None:
    with pytest.raises(ValueError, match=rf"moe\.{field}='{value}' is not allowed; choose one of"):
        from_dict({"moe": {field: value}})


def test_bad_literal_train_dtype() -> None:
    with pytest.raises(ValueError, match=r"train\.dtype='float16' is not allowed; choose one of 'float32', 'bfloat16'"):
        from_dict({"train": {"dtype": "float16"}})


@pytest.mark.parametrize("path,value", [("moe.top_k", "two"), ("model.dim", 1.5), ("model.dim", True),
                                        ("train.steps", None), ("moe.num_experts", [8])])
def test_wrong_type_int(path, value) -> None:
    section, key = path.split(".")
    with pytest.raises(ValueError, match=rf"{re.escape(path)}={re.escape(repr(value))} must be an integer"):
        from_dict({section: {key: value}})


def test_int_accepts_integral_float_and_numeric_string() -> None:
    cfg = from_dict({"model": {"dim": 256.0}, "moe": {"top_k": "1"}})
    assert cfg.model.dim == 256 and isinstance(cfg.model.dim, int)
    assert cfg.moe.top_k == 1 and isinstance(cfg.moe.top_k, int)


@pytest.mark.parametrize("path,value", [("train.lr", "fast"), ("moe.capacity_factor", "big"),
                                        ("train.lr", None)])
def test_wrong_type_float(path, value) -> None:
    section, key = path.split(".")
    with pytest.raises(ValueError, match=rf"{re.escape(path)}={re.escape(repr(value))} must be a number"):
        from_dict({section: {key: value}})


def test_float_accepts_int_and_string() -> None:
    cfg = from_dict({"train": {"lr": 1, "min_lr": "1e-4"}})
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.min_lr == pytest.approx(1e-4)


@pytest.mark.parametrize("text,expected", [("true", True), ("True", True), ("1", True), ("yes", True),
                                           ("YES", True), ("false", False), ("0", False), ("no", False),
                                           ("False", False)])
def test_bool_coercion_from_strings(text, expected) -> None:
    assert from_dict({"moe": {"renormalize": text}}).moe.renormalize is expected


@pytest.mark.parametrize("value", ["maybe", 2, 1.0, None])
def test_bool_rejects_other_values(value) -> None:
    with pytest.raises(ValueError, match=rf"moe\.renormalize={re.escape(repr(value))} must be true or false"):
        from_dict({"moe": {"renormalize": value}})


@pytest.mark.parametrize("value", [None, "null", "None", "NULL", "none"])
@pytest.mark.parametrize("path", ["moe.capacity_factor", "moe.shared_expert_hidden", "model.n_kv_heads",
                                  "parallel.world_size"])
def test_optional_fields_accept_null(path, value) -> None:
    section, key = path.split(".")
    cfg = from_dict({section: {key: value}})
    assert getattr(getattr(cfg, section), key) is None
    validate(cfg)


def test_optional_fields_coerce_inner_type() -> None:
    cfg = from_dict({"moe": {"capacity_factor": "1.25", "shared_expert_hidden": "64"},
                     "model": {"n_kv_heads": 2}})
    assert cfg.moe.capacity_factor == 1.25 and cfg.moe.shared_expert_hidden == 64 and cfg.model.n_kv_heads == 2
    with pytest.raises(ValueError, match=r"model\.n_kv_heads='two' must be an integer"):
        from_dict({"model": {"n_kv_heads": "two"}})


def test_str_field_coerces_to_str() -> None:
    assert from_dict({"train": {"out_dir": 123}}).train.out_dir == "123"


# ------------------------------------------------------------------------------------------- validate_moe

@pytest.mark.parametrize("top_k", [9, 100])
def test_top_k_exceeds_num_experts(top_k) -> None:
    _bad(rf"moe\.top_k={top_k}: cannot exceed moe\.num_experts=8; lower top_k or add experts", moe={"top_k": top_k})


def test_top_k_equal_num_experts_ok() -> None:
    validate(_cfg(moe={"top_k": 8}))


@pytest.mark.parametrize("top_k", [0, -1])
def test_top_k_below_one(top_k) -> None:
    _bad(rf"moe\.top_k={top_k}: must be >= 1", moe={"top_k": top_k})


def test_num_experts_below_one() -> None:
    _bad(r"moe\.num_experts=0: must be >= 1", moe={"num_experts": 0})


def test_expert_hidden_below_one() -> None:
    _bad(r"moe\.expert_hidden=-1: must be >= 1", moe={"expert_hidden": -1})


@pytest.mark.parametrize("cf", [0, 0.0, -1, -1.0, float("nan")])
def test_capacity_factor_not_positive(cf) -> None:
    _bad(r"moe\.capacity_factor=.*: must be > 0, or null for dropless routing", moe={"capacity_factor": cf})


def test_capacity_factor_null_is_dropless_and_accepted() -> None:
    cfg = _cfg(moe={"capacity_factor": None})
    validate(cfg)
    assert load_text("moe: {capacity_factor: null}").moe.capacity_factor is None


def test_capacity_factor_positive_ok() -> None:
    validate(_cfg(moe={"capacity_factor": 0.5}))
    validate(_cfg(moe={"capacity_factor": 1.25, "pad_to_capacity": True}))


def test_min_capacity_negative() -> None:
    _bad(r"moe\.min_capacity=-1: must be >= 0", moe={"min_capacity": -1})


def test_pad_to_capacity_needs_capacity_factor() -> None:
    _bad(r"moe\.pad_to_capacity=True: needs moe\.capacity_factor to be set \(dropless has no capacity\)",
         moe={"pad_to_capacity": True, "capacity_factor": None})


def test_num_groups_below_one() -> None:
    _bad(r"moe\.num_groups=0: must be >= 1", moe={"num_groups": 0})


def test_num_groups_must_divide_num_experts() -> None:
    _bad(r"moe\.num_groups=3: must divide moe\.num_experts=8", moe={"num_groups": 3})


@pytest.mark.parametrize("tg", [0, 5])
def test_topk_groups_out_of_range(tg) -> None:
    _bad(rf"moe\.topk_groups={tg}: must be between 1 and moe\.num_groups=4",
         moe={"num_groups": 4, "topk_groups": tg})


def test_top_k_exceeds_experts_in_selected_groups() -> None:
    # 8 experts in 4 groups of 2; one group selected -> only 2 experts reachable, top_k=3 impossible.
    _bad(r"moe\.top_k=3: exceeds the 2 experts in the selected groups; raise moe\.topk_groups",
         moe={"num_groups": 4, "topk_groups": 1, "top_k": 3})
    validate(_cfg(moe={"num_groups": 4, "topk_groups": 2, "top_k": 3}))   # the fix works


@pytest.mark.parametrize("eps", [-0.1, 1.0, 2.0])
def test_jitter_eps_range(eps) -> None:
    _bad(rf"moe\.jitter_eps={eps}: must be in \[0, 1\)", moe={"jitter_eps": eps})


@pytest.mark.parametrize("name", ["aux_loss_coef", "z_loss_coef", "bias_update_rate"])
def test_loss_coefs_non_negative(name) -> None:
    _bad(rf"moe\.{name}=-0\.5: must be >= 0", moe={name: -0.5})


@pytest.mark.parametrize("rs", [0.0, -1.0])
def test_route_scale_positive(rs) -> None:
    _bad(rf"moe\.route_scale={rs}: must be > 0", moe={"route_scale": rs})


def test_shared_expert_gate_needs_shared_experts() -> None:
    _bad(r"moe\.shared_expert_gate=True: gates the shared experts, but moe\.num_shared_experts=0",
         moe={"shared_expert_gate": True})
    validate(_cfg(moe={"shared_expert_gate": True, "num_shared_experts": 1}))


def test_num_shared_experts_negative() -> None:
    _bad(r"moe\.num_shared_experts=-1: must be >= 0", moe={"num_shared_experts": -1})


def test_shared_expert_hidden_below_one() -> None:
    _bad(r"moe\.shared_expert_hidden=0: must be >= 1, or null for num_shared_experts \* expert_hidden",
         moe={"shared_expert_hidden": 0})


def test_validate_moe_alone() -> None:
    with pytest.raises(ValueError, match=r"moe\.top_k=9: cannot exceed moe\.num_experts=8"):
        validate_moe(MoEConfig(top_k=9))


# ----------------------------------------------------------------------------------------------- validate

@pytest.mark.parametrize("name", ["vocab_size", "dim", "n_layers", "n_heads", "max_seq_len", "dense_hidden",
                                  "moe_every"])
@pytest.mark.parametrize("value", [0, -1])
def test_model_sizes_positive(name, value) -> None:
    _bad(rf"model\.{name}={value}: must be >= 1", model={name: value})


def test_first_dense_negative() -> None:
    _bad(r"model\.first_dense=-1: must be >= 0", model={"first_dense": -1})


def test_dim_not_divisible_by_heads() -> None:
    _bad(r"model\.dim=130 is not divisible by model\.n_heads=4; choose a head count that divides dim",
         model={"dim": 130, "n_heads": 4})


def test_odd_head_dim() -> None:
    _bad(r"the head size 3 \(model\.head_dim, or model\.dim / model\.n_heads\) must be even for rotary embeddings", model={"dim": 12, "n_heads": 4})


@pytest.mark.parametrize("kv", [3, 0, -2])
def test_n_kv_heads_must_divide_n_heads(kv) -> None:
    _bad(rf"model\.n_kv_heads={kv} must divide model\.n_heads=4", model={"n_kv_heads": kv})


@pytest.mark.parametrize("kv", [1, 2, 4])
def test_n_kv_heads_divisors_ok(kv) -> None:
    validate(_cfg(model={"n_kv_heads": kv}))


def test_timeout_positive() -> None:
    _bad(r"parallel\.timeout_s=0(\.0)?: must be > 0", parallel={"timeout_s": 0.0})


@pytest.mark.parametrize("name", ["steps", "batch_size", "seq_len", "log_every"])
def test_train_counts_positive(name) -> None:
    _bad(rf"train\.{name}=0: must be >= 1", train={name: 0})


def test_seq_len_exceeds_max_seq_len() -> None:
    _bad(r"train\.seq_len=512 exceeds model\.max_seq_len=256; lower seq_len or raise max_seq_len",
         train={"seq_len": 512})
    validate(_cfg(train={"seq_len": 256}))


@pytest.mark.parametrize("name", ["lr", "min_lr", "weight_decay", "grad_clip", "warmup_steps"])
def test_train_non_negative(name) -> None:
    _bad(rf"train\.{name}=-1: must be >= 0", train={name: -1})


def test_min_lr_exceeds_lr() -> None:
    _bad(r"train\.min_lr=0\.01 exceeds train\.lr=0\.001", train={"lr": 1e-3, "min_lr": 1e-2})
    validate(_cfg(train={"lr": 1e-3, "min_lr": 1e-3}))


@pytest.mark.parametrize("path", ["train.lr", "train.grad_clip", "parallel.timeout_s"])
def test_nan_values_rejected(path) -> None:
    section, key = path.split(".")
    with pytest.raises(ValueError, match=re.escape(path)):
        validate(apply_overrides(Config(), [f"--{path}=nan"]))


@pytest.mark.parametrize("vf", [-0.1, 1.0])
def test_val_fraction_range(vf) -> None:
    _bad(rf"data\.val_fraction={vf}: must be in \[0, 1\)", data={"val_fraction": vf})


# ---------------------------------------------------------------------------------------------- overrides

@pytest.mark.parametrize("item", ["--moe.top_k=1", "moe.top_k=1"])
def test_override_with_and_without_dashes(item) -> None:
    cfg = apply_overrides(Config(), [item])
    assert cfg.moe.top_k == 1 and isinstance(cfg.moe.top_k, int)


def test_override_does_not_mutate_input() -> None:
    base = Config()
    apply_overrides(base, ["--moe.top_k=1"])
    assert base.moe.top_k == 2


def test_override_yaml_scalars() -> None:
    cfg = apply_overrides(_cfg(moe={"capacity_factor": 1.25}),
                          ["--moe.capacity_factor=null", "--moe.renormalize=true", "--train.lr=1e-4",
                           "--model.n_kv_heads=2", "--moe.score_func=sigmoid", "--train.out_dir=runs/x=y"])
    assert cfg.moe.capacity_factor is None
    assert cfg.moe.renormalize is True
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.model.n_kv_heads == 2
    assert cfg.moe.score_func == "sigmoid"
    assert cfg.train.out_dir == "runs/x=y"            # only the first '=' splits


def test_override_later_wins() -> None:
    assert apply_overrides(Config(), ["moe.top_k=1", "--moe.top_k=4"]).moe.top_k == 4


def test_override_bool_false_and_null_string_forms() -> None:
    cfg = apply_overrides(_cfg(moe={"renormalize": True}), ["--moe.renormalize=false", "--model.n_kv_heads=None"])
    assert cfg.moe.renormalize is False and cfg.model.n_kv_heads is None


def test_override_without_equals() -> None:
    with pytest.raises(ValueError, match=r"override '--moe\.top_k' must look like --section\.field=value"):
        apply_overrides(Config(), ["--moe.top_k"])


@pytest.mark.parametrize("item", ["--top_k=1", "--moe.top_k.x=1"])
def test_override_key_needs_one_dot(item) -> None:
    key = item[2:].split("=")[0]
    with pytest.raises(ValueError, match=rf"override key '{re.escape(key)}' must be section\.field, e\.g\. moe\.top_k"):
        apply_overrides(Config(), [item])


def test_override_unknown_section_and_key_suggest() -> None:
    with pytest.raises(ValueError, match=r"unknown config section 'mode'; did you mean 'model'\?"):
        apply_overrides(Config(), ["--mode.dim=64"])
    with pytest.raises(ValueError, match=r"unknown field in 'moe' 'topk'; did you mean 'top_k'\?"):
        apply_overrides(Config(), ["--moe.topk=1"])


def test_override_bad_types_name_field() -> None:
    with pytest.raises(ValueError, match=r"moe\.top_k='two' must be an integer"):
        apply_overrides(Config(), ["--moe.top_k=two"])
    with pytest.raises(ValueError, match=r"model\.dim=1\.5 must be an integer"):
        apply_overrides(Config(), ["--model.dim=1.5"])
    with pytest.raises(ValueError, match=r"moe\.score_func='tanh' is not allowed; choose one of 'softmax', 'sigmoid'"):
        apply_overrides(Config(), ["--moe.score_func=tanh"])


def test_override_str_field_keeps_text_verbatim() -> None:
    cfg = apply_overrides(Config(), ["--train.out_dir=001", "--data.path=true"])
    assert cfg.train.out_dir == "001" and cfg.data.path == "true"


# ---------------------------------------------------------------------------------------------------- load

def load_text(text: str, overrides: list[str] | None = None) -> Config:
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "c.yaml"
        p.write_text(text)
        return load(p, overrides)


def test_load_missing_file_points_to_presets(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ValueError, match=rf"config file '{re.escape(str(missing))}' does not exist; "
                                         r"presets are in configs/"):
        load(missing)


def test_load_directory_is_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"does not exist; presets are in configs/"):
        load(tmp_path)


def test_load_applies_overrides_then_validates() -> None:
    cfg = load_text("moe: {num_experts: 8, top_k: 2}\n", ["--moe.top_k=1"])
    assert cfg.moe.top_k == 1
    with pytest.raises(ValueError, match=r"moe\.top_k=99: cannot exceed moe\.num_experts=8"):
        load_text("moe: {num_experts: 8}\n", ["--moe.top_k=99"])


def test_load_validates_file_values() -> None:
    with pytest.raises(ValueError, match=r"model\.dim=-1: must be >= 1"):
        load_text("model: {dim: -1}\n")


def test_load_empty_file_gives_defaults() -> None:
    assert load_text("") == Config()
    assert load_text("# only a comment\n") == Config()


def test_load_unknown_key_in_file() -> None:
    with pytest.raises(ValueError, match=r"unknown field in 'train' 'step'; did you mean 'steps'\?"):
        load_text("train: {step: 10}\n")


def test_presets_exist() -> None:
    assert len(PRESETS) >= 5, PRESETS


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_every_preset_loads_and_validates(path: Path) -> None:
    cfg = load(path)
    validate(cfg)
    assert isinstance(cfg, Config)
    assert from_dict(to_dict(cfg)) == cfg


# -------------------------------------------------------------------------------------------- round trip

def test_round_trip_defaults_and_customised() -> None:
    assert from_dict(to_dict(Config())) == Config()
    cfg = _cfg(moe={"capacity_factor": 1.5, "score_func": "sigmoid", "renormalize": True, "num_groups": 2},
               model={"n_kv_heads": 2}, parallel={"world_size": 4}, train={"dtype": "bfloat16"})
    d = to_dict(cfg)
    assert set(d) == set(C.SECTIONS) == {"model", "moe", "parallel", "train", "data", "checkpoint"}
    assert from_dict(d) == cfg


def test_round_trip_through_yaml(tmp_path: Path) -> None:
    import yaml
    cfg = _cfg(moe={"capacity_factor": None, "top_k": 1}, train={"lr": 1e-4, "min_lr": 1e-5})
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(to_dict(cfg)))
    assert load(p) == cfg


def test_capacity_groups_below_one() -> None:
    _bad(r"moe\.capacity_groups=0: must be >= 1", moe={"capacity_groups": 0})


def test_balance_over_choices() -> None:
    with pytest.raises(ConfigError, match=r"moe\.balance_over='batch' is not allowed; choose one of "
                                          r"'micro_batch', 'global_batch'"):
        from_dict({"moe": {"balance_over": "batch"}})


# ---------------------------------------------------------------------------- pipeline fields (parallel.pp*)

def test_pipeline_defaults_are_one_stage() -> None:
    p = Config().parallel
    assert (p.pp, p.pp_virtual, p.pp_schedule, p.pp_layers) == (1, 1, "1f1b", None)


@pytest.mark.parametrize("text,expected", [("[1,2,1]", [1, 2, 1]), ("1,2,1", [1, 2, 1]), ("[3]", [3]),
                                           ("null", None), ("[]", [])])
def test_pp_layers_override_is_a_list_of_integers(text, expected) -> None:
    assert apply_overrides(Config(), [f"--parallel.pp_layers={text}"]).parallel.pp_layers == expected


@pytest.mark.parametrize("value,match", [([1, "x"], r"parallel\.pp_layers\[1\]='x' must be an integer"),
                                         ([1.5], r"parallel\.pp_layers\[0\]=1\.5 must be an integer"),
                                         (3, r"parallel\.pp_layers=3 must be a list"),
                                         ({"a": 1}, r"parallel\.pp_layers=\{'a': 1\} must be a list")])
def test_pp_layers_must_be_a_list_of_integers(value, match) -> None:
    with pytest.raises(ConfigError, match=match):
        from_dict({"parallel": {"pp_layers": value}})


def test_pp_schedule_lists_its_choices() -> None:
    with pytest.raises(ConfigError, match=r"parallel\.pp_schedule='zb' is not allowed; choose one of 'gpipe', "
                                          r"'1f1b', 'interleaved'"):
        apply_overrides(Config(), ["--parallel.pp_schedule=zb"])


def test_pipeline_fields_round_trip_through_to_dict() -> None:
    cfg = apply_overrides(Config(), ["--parallel.pp=2", "--parallel.pp_virtual=2", "--parallel.pp_schedule=interleaved",
                                     "--parallel.pp_layers=[1,1,1,1]"])
    assert from_dict(to_dict(cfg)) == cfg
