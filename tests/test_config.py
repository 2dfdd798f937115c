"""Loading configurations: YAML recipes and dotted overrides fail with one clear line (issue 17, items 5 and 9)."""

from __future__ import annotations

import pytest

from medlvr.config import SFTConfig, VLPOConfig, load_config
from medlvr.errors import MedlvrError


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "mode: roi\nlatent: [1,\n",
            r"not valid YAML at line 3, column 1: did not find expected node content",
        ),
        ("mode: roi\n\tseed: 2\n", r"not valid YAML at line 2, column 1: found a tab character"),
        (
            "- mode: roi\n- seed: 2\n",
            r"must be a mapping of settings .* at the top level, not a list",
        ),
    ],
)
def test_a_broken_recipe_is_one_line_naming_the_file(tmp_path, text, message):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    with pytest.raises(MedlvrError, match=message) as err:
        load_config(SFTConfig, path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_an_empty_override_is_an_empty_string_or_list():
    """`data.val=` is what the docs say turns validation off."""
    cfg = load_config(SFTConfig, None, ["data.val=", "curriculum="])
    assert cfg.data.val == "" and cfg.curriculum == []
    assert load_config(VLPOConfig, None, ["data.val= "]).data.val == ""
    with pytest.raises(MedlvrError, match="seed: Incompatible value 'None'"):
        load_config(SFTConfig, None, ["seed="])  # a number still needs a value
