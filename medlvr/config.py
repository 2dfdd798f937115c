"""Typed configuration: dataclasses with one docstring per field, YAML recipes, dotted overrides.

`load_config(Schema, "recipe.yaml", ["sft.lr=1e-4", "latent.steps=8"])` merges a
YAML file and command-line overrides onto the schema with OmegaConf, so an
unknown key or a value of the wrong type fails before any compute, with the
key's full name in the message. `__post_init__` checks values.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from medlvr.errors import MedlvrError

ProjectorKind = Literal["none", "linear", "mlp", "norm"]


@dataclass
class LatentConfig:
    """The latent segment inserted between the question and the answer."""

    steps: int = 4
    """K: number of continuous latent steps (0 = answer directly, the plain backbone)."""
    projector: ProjectorKind = "norm"
    """Map from the fed-back last hidden state to the next input embedding.
    `none` feeds it as is; `linear` and `mlp` are learned (initialised to identity);
    `norm` rescales it to the typical norm of token embeddings (with a learned
    scale), since the final-norm hidden state is 18-50x larger than token embeddings."""

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise MedlvrError(f"latent.steps must be >= 0, got {self.steps}")
        if self.projector not in ("none", "linear", "mlp", "norm"):
            raise MedlvrError(f"latent.projector must be none, linear, mlp or norm, got {self.projector!r}")


T = TypeVar("T")


def load_config(schema: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Build a `schema` instance from an optional YAML file and `key.sub=value` overrides."""
    base = OmegaConf.structured(schema)
    try:
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise MedlvrError(f"config file not found: {path}")
            base = OmegaConf.merge(base, OmegaConf.load(path))
        if overrides:
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise MedlvrError(f"overrides must look like key.sub=value, got {bad}")
            base = OmegaConf.merge(base, OmegaConf.from_dotlist(list(overrides)))
        obj = OmegaConf.to_object(base)
    except OmegaConfBaseException as err:
        raise MedlvrError(f"bad configuration: {_first_line(err)}") from None
    return obj  # type: ignore[return-value]


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain dict of a config dataclass (for saving next to checkpoints)."""
    if not is_dataclass(cfg):
        raise TypeError(f"expected a config dataclass, got {type(cfg).__name__}")
    return asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    OmegaConf.save(OmegaConf.structured(cfg), Path(path))


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    msg = text[0] if text else type(err).__name__
    key = getattr(err, "full_key", None)
    return f"{key}: {msg}" if key and key not in msg else msg


__all__ = ["LatentConfig", "ProjectorKind", "load_config", "save_config", "to_dict", "field"]
