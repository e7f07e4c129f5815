"""List flags parse one way; tuple defaults print as the flags spell them."""

import pytest

from dynres.cli.options import join, parse_list, parse_pairs, span
from dynres.errors import ConfigError
from dynres.paper import PAPER_GRID


def test_list_flags_parse_one_way():
    assert parse_list("112..224:56") == (112, 168, 224) and parse_list("32, 64") == (32, 64)
    assert parse_list("112..224") == (112, 168, 224)  # the paper grid's step
    assert parse_list("0.25,1.0", float) == (0.25, 1.0)
    assert parse_list("eager, ort", str) == ("eager", "ort")
    assert parse_list(None) is None and parse_list(" ") is None
    with pytest.raises(ConfigError, match="--grid"):
        parse_list("big", int, "--grid")
    with pytest.raises(ConfigError, match="--crops"):
        parse_list("0.5,wide", float, "--crops")


def test_defaults_print_as_the_flags_spell_them():
    assert join((0.25, 1.0)) == "0.25,1.0" and join((1,)) == "1"
    assert span((112, 168, 224)) == "112..224:56" and span((32, 64)) == "32,64" and span((1, 2, 4)) == "1,2,4"
    assert parse_list(span(PAPER_GRID)) == PAPER_GRID


def test_a_recalibration_flag_parses_to_pairs_and_refuses_anything_else():
    assert parse_pairs("0.5,-1;2,0.25", "--recalibration") == ((0.5, -1.0), (2.0, 0.25))
    assert parse_pairs("", "--recalibration") is None
    for bad in ("0.5,-1;2", "0.5;-1", "a,b"):
        with pytest.raises(ConfigError, match="--recalibration"):
            parse_pairs(bad, "--recalibration")
