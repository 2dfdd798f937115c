"""What the installed package ships, by name: the training recipes and the stage-0 backbone.

A recipe is a YAML file under `medlvr/configs/`, named by its path there without `.yaml`:
`medlvr train sft --config tiny/sft` reads `medlvr/configs/tiny/sft.yaml` (`medlvr recipes`
lists them). `stage0` names the shipped backbone (`medlvr/assets/stage0`) wherever a model is
given. A file or folder of the same name in the working directory wins over both.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
CONFIGS = PACKAGE / "configs"
MODELS: dict[str, Path] = {"stage0": PACKAGE / "assets" / "stage0"}
"""Shipped model name -> its folder."""


def recipes() -> dict[str, Path]:
    """Every shipped recipe: name (`tiny/sft`) -> its YAML file, sorted by name."""
    found = {p.relative_to(CONFIGS).with_suffix("").as_posix(): p for p in CONFIGS.rglob("*.yaml")}
    return dict(sorted(found.items()))


def recipe_path(name: str | Path) -> Path | None:
    """The YAML file of shipped recipe `name` (`tiny/sft` or `tiny/sft.yaml`), or None."""
    key = Path(name).as_posix().removesuffix(".yaml")
    return recipes().get(key)


def recipe_summary(path: Path) -> str:
    """The first sentence of a recipe's leading comment: what it trains, on what."""
    words: list[str] = []
    for line in path.read_text().splitlines():
        text = line.lstrip("#").strip()
        if not line.startswith("#") or (not text and words):
            break
        words.append(text)
    first = " ".join(w for w in words if w)
    for end in (". ", "; "):
        first = first.split(end)[0]
    return first.rstrip(".")


__all__ = ["MODELS", "CONFIGS", "recipes", "recipe_path", "recipe_summary"]
