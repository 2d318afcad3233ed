"""Tests for how moe_dist.config reads a YAML file: every failure is one ConfigError naming the file and where in
it (line and column, or the byte offset), a key given twice is refused naming both lines, null is refused in a
field that has no "unset" meaning, and only plain values load (no tags). train.seed's range is here too: it is
checked once, in validate."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from moe_dist.config import SEED_MAX, Config, ConfigError, load


def _write(tmp_path: Path, text: str | bytes, name: str = "c.yaml") -> Path:
    p = tmp_path / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return p


def _error(tmp_path: Path, text: str | bytes, overrides=None) -> str:
    p = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(p, overrides)
    return str(info.value)


# ------------------------------------------------------------------------------------------- duplicate keys

def test_two_sections_of_the_same_name_are_refused_naming_both_lines(tmp_path):
    """The plain loader keeps the last `model:` silently: the first section's fields were never used."""
    msg = _error(tmp_path, "model:\n  dim: 64\ntrain:\n  steps: 3\nmodel:\n  n_layers: 2\n")
    assert msg == (f"{tmp_path / 'c.yaml'}:5: key 'model' appears twice in one mapping (lines 1 and 5); the first "
                   "would be ignored: merge them into one")


def test_a_field_given_twice_in_a_section_is_refused(tmp_path):
    msg = _error(tmp_path, "train:\n  steps: 3\n  lr: 0.1\n  steps: 5\n")
    assert "c.yaml:4: key 'steps' appears twice in one mapping (lines 2 and 4)" in msg


def test_a_field_given_twice_on_one_line_is_refused(tmp_path):
    msg = _error(tmp_path, "train: {steps: 1, steps: 2}\n")
    assert "key 'steps' appears twice in one mapping (both on line 1)" in msg


def test_merge_keys_may_override_what_they_merge(tmp_path):
    """`<<: *anchor` then an explicit key is YAML's way to override a merged value, not a duplicate."""
    cfg = load(_write(tmp_path, "train:\n  <<: {steps: 3, lr: 0.01}\n  steps: 5\n"))
    assert cfg.train.steps == 5 and cfg.train.lr == 0.01


# --------------------------------------------------------------------------------------------------- null

@pytest.mark.parametrize("field,line", [("out_dir", "train:\n  out_dir: null\n"), ("out_dir", "train:\n  out_dir:\n"),
                                        ("path", "data:\n  path: ~\n")])
def test_null_in_a_text_field_is_refused_naming_field_and_line(tmp_path, field, line):
    """Before: str(None) made train.out_dir "None", and the run wrote into ./None/."""
    msg = _error(tmp_path, line)
    section = "train" if field == "out_dir" else "data"
    assert msg.startswith(f"{tmp_path / 'c.yaml'}:2: {section}.{field} is null, which this field does not take; "
                          "give it a value, or delete the line to keep the default")


def test_null_in_an_optional_field_is_none(tmp_path):
    cfg = load(_write(tmp_path, "checkpoint:\n  dir: null\nmoe:\n  capacity_factor: ~\n"))
    assert cfg.checkpoint.dir is None and cfg.moe.capacity_factor is None


def test_null_in_a_number_field_names_the_line(tmp_path):
    msg = _error(tmp_path, "train:\n  lr: 0.1\n  steps: null\n")
    assert msg == f"{tmp_path / 'c.yaml'}:3: train.steps=None must be an integer"


def test_a_list_in_a_text_field_is_refused(tmp_path):
    msg = _error(tmp_path, "train:\n  out_dir: [a, b]\n")
    assert "c.yaml:2: train.out_dir=['a', 'b'] must be text, not a list" in msg


def test_an_empty_section_keeps_its_defaults(tmp_path):
    assert load(_write(tmp_path, "model:\ntrain:\n")) == Config()


# -------------------------------------------------------------------------------------------- YAML errors

def test_a_python_tag_is_refused_as_a_config_error_with_its_position(tmp_path):
    msg = _error(tmp_path, "train:\n  out_dir: !!python/object/apply:os.system ['echo hi']\n")
    assert msg == (f"{tmp_path / 'c.yaml'}:2:12: could not determine a constructor for the tag "
                   "'tag:yaml.org,2002:python/object/apply:os.system'; configs hold plain values only (no tags)")


def test_a_syntax_error_names_file_line_and_column(tmp_path):
    msg = _error(tmp_path, "train:\n  steps: 3\n   lr: 0.1\n")
    assert re.match(rf"{re.escape(str(tmp_path / 'c.yaml'))}:3:\d+: .*mapping values are not allowed here; fix the "
                    "YAML syntax there", msg), msg


def test_an_unclosed_bracket_names_where_the_file_ends(tmp_path):
    msg = _error(tmp_path, "train:\n  steps: [1, 2\n")
    assert msg.startswith(f"{tmp_path / 'c.yaml'}:3:1: while parsing a flow sequence expected ',' or ']'")


def test_a_tab_in_the_indentation_names_its_position(tmp_path):
    msg = _error(tmp_path, "train:\n\tsteps: 3\n")
    assert msg.startswith(f"{tmp_path / 'c.yaml'}:2:1: ") and "tab" in msg


def test_a_non_utf8_config_names_the_byte_offset_and_line(tmp_path):
    msg = _error(tmp_path, b"train:\n  out_dir: caf\xe9\n")
    assert msg == (f"config file '{tmp_path / 'c.yaml'}' is not UTF-8 text: byte 0xe9 at offset 21 (line 2); save "
                   "it as UTF-8")


def test_a_utf8_byte_order_mark_is_accepted(tmp_path):
    assert load(_write(tmp_path, b"\xef\xbb\xbftrain:\n  steps: 7\n")).train.steps == 7


def test_a_non_name_key_is_refused(tmp_path):
    assert "field 1 in section 'train' is not a name" in _error(tmp_path, "train:\n  1: 2\n")
    assert "config section 3 is not a name" in _error(tmp_path, "3: {}\n")


# ---------------------------------------------------------------------------------------------------- seed

@pytest.mark.parametrize("seed", [-1, SEED_MAX + 1, 2**64])
def test_a_seed_out_of_range_is_refused(tmp_path, seed):
    """torch.manual_seed raises past 2**64 - 1 and numpy's generators refuse negative seeds: both failed at run
    time before, as a traceback."""
    msg = _error(tmp_path, f"train:\n  seed: {seed}\n")
    assert msg == (f"train.seed={seed}: must be in 0..{SEED_MAX} (2**32 - 1); the trainer seeds torch and numpy "
                   "with it, offset by the rank and the step")


@pytest.mark.parametrize("seed", [0, SEED_MAX])
def test_the_seed_range_ends_are_accepted(tmp_path, seed):
    assert load(_write(tmp_path, f"train:\n  seed: {seed}\n")).train.seed == seed


def test_the_largest_seed_seeds_torch_and_numpy():
    import numpy as np
    import torch
    torch.manual_seed(SEED_MAX + 7)                          # + the rank
    torch.manual_seed(SEED_MAX * 1_000_003 + 10**9 * 1009 + 4096)  # a resharded resume's formula
    np.random.default_rng([SEED_MAX, 10**9, 4096])


def test_a_bad_pp_layers_entry_names_the_field_and_the_line(tmp_path):
    assert load(_write(tmp_path, "parallel:\n  pp: 2\n  pp_layers: [2, 2]\n")).parallel.pp_layers == [2, 2]
    assert "c.yaml:3: parallel.pp_layers[1]='two' must be an integer" in _error(
        tmp_path, "parallel:\n  pp: 2\n  pp_layers: [2, two]\n")
