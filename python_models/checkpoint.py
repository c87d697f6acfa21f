"""Checkpoints for the thin models: one file holding the model's class, its configuration and its
state_dict, so that ``load_checkpoint(path)`` rebuilds the model, and loading into a model of another
configuration fails with an error that names every mismatched key and shape.

Every model in ``python_models`` keeps its constructor arguments in a dataclass at ``model.config`` and
can be rebuilt as ``type(model)(config)``.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from typing import Any, Mapping, Optional, Union

import torch
from torch import Tensor, nn

FORMAT = "vlm_kernels.python_models/1"


class CheckpointMismatchError(ValueError):
    """A state_dict whose keys or shapes do not match the model it is loaded into."""


def mismatches(expected: Mapping[str, Tensor], state_dict: Mapping[str, Tensor]) -> list[str]:
    """Human-readable lines for each key missing, unexpected, or of another shape (empty: they match).
    ``expected`` is the state_dict of the model that is to receive ``state_dict``."""
    lines = [f"missing key {k!r} (model shape {tuple(v.shape)})" for k, v in expected.items() if k not in state_dict]
    lines += [f"unexpected key {k!r} (checkpoint shape {tuple(v.shape)})" for k, v in state_dict.items()
              if k not in expected]
    lines += [f"key {k!r}: checkpoint shape {tuple(state_dict[k].shape)}, model shape {tuple(v.shape)}"
              for k, v in expected.items() if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    return lines


def check_state_dict(name: str, expected: Mapping[str, Tensor], state_dict: Mapping[str, Tensor], *,
                     what: str = "checkpoint", config: Any = None, saved_config: Optional[Mapping] = None) -> None:
    """Raise :class:`CheckpointMismatchError` listing every mismatched key and shape (and the configuration
    fields that differ, when both configurations are known)."""
    problems = mismatches(expected, state_dict)
    if not problems:
        return
    msg = f"{name}: the {what} does not match this model ({len(problems)} mismatched keys):\n  "
    msg += "\n  ".join(problems[:40])
    if len(problems) > 40:
        msg += f"\n  ... and {len(problems) - 40} more"
    if saved_config is not None and dataclasses.is_dataclass(config):
        diff = [f"{k}: checkpoint {saved_config.get(k)!r}, model {v!r}"
                for k, v in dataclasses.asdict(config).items() if _plain(saved_config.get(k)) != _plain(v)]
        if diff:
            msg += "\nconfiguration differs: " + "; ".join(diff)
    raise CheckpointMismatchError(msg)


def load_state_dict_checked(model: nn.Module, state_dict: Mapping[str, Tensor], *, what: str = "checkpoint",
                            saved_config: Optional[Mapping[str, Any]] = None) -> None:
    """``model.load_state_dict(state_dict)``, raising :class:`CheckpointMismatchError` that names every
    mismatched key and shape instead of torch's generic error."""
    check_state_dict(type(model).__name__, model.state_dict(), state_dict, what=what,
                     config=getattr(model, "config", None), saved_config=saved_config)
    model.load_state_dict(state_dict)


def _plain(v):
    return list(v) if isinstance(v, tuple) else v


def save_checkpoint(model: nn.Module, path: Union[str, os.PathLike], **extra: Any) -> None:
    """Write ``model``'s class, configuration and state_dict (plus ``extra`` entries, e.g. the step) to ``path``."""
    config = getattr(model, "config", None)
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"save_checkpoint: {type(model).__name__} has no dataclass .config to save")
    cls = type(model)
    payload = {"format": FORMAT, "class": f"{cls.__module__}.{cls.__qualname__}",
               "config": dataclasses.asdict(config), "state_dict": model.state_dict(), "extra": extra}
    torch.save(payload, path)


def read_checkpoint(path: Union[str, os.PathLike], map_location: Union[str, torch.device] = "cpu") -> dict:
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"read_checkpoint: {os.fspath(path)!r} is not a python_models checkpoint "
                         f"(expected format {FORMAT!r})")
    return payload


def load_checkpoint(path: Union[str, os.PathLike], model: Optional[nn.Module] = None,
                    map_location: Union[str, torch.device] = "cpu") -> nn.Module:
    """Load ``path`` into ``model`` (checked: a clear error on any mismatch), or, without a model, rebuild
    the saved class from the saved configuration. Returns the model."""
    payload = read_checkpoint(path, map_location)
    if model is None:
        module_name, _, cls_name = payload["class"].rpartition(".")
        cls = getattr(importlib.import_module(module_name), cls_name)
        config_cls = cls.Config
        model = cls(config_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in payload["config"].items()}))
    load_state_dict_checked(model, payload["state_dict"], what=f"checkpoint {os.fspath(path)!r}",
                            saved_config=payload["config"])
    return model


__all__ = ["CheckpointMismatchError", "check_state_dict", "load_checkpoint", "load_state_dict_checked", "mismatches",
           "read_checkpoint", "save_checkpoint"]
