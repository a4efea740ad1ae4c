"""Which tensors get their own mixing coefficient ("layers" of the "+" methods), and how the rest are mixed.

The rule, for a model's ``state_dict()``:

* **Layers** are the floating-point parameter tensors, counted once when parameters are tied or shared
  (``named_parameters()`` order). By default each such tensor is one layer (a ViT-B/32 has ~150); pass
  ``grouping="module"`` to give the parameters of one module (e.g. ``weight`` and ``bias``) one shared
  coefficient, or a callable ``name -> group label`` for any other grouping. Model-wise methods have L = 1.
* **Floating buffers** (e.g. BatchNorm ``running_mean``/``running_var``) are mixed with the same weights as
  the first parameter of their own module (a BatchNorm's ``weight``); a floating buffer whose module has
  no parameter uses the mean of the layer coefficients. They receive no gradient.
* **Integer tensors** (e.g. ``num_batches_tracked``) are taken from the first model.
* **Aliases** (other state-dict names of a tied parameter) get the tensor of their canonical name.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from torch import Tensor, nn

from soupkit.config import Grouping

__all__ = ["LayerMap", "layer_map"]

@dataclass(frozen=True)
class LayerMap:
    """How the state-dict keys of one architecture are mixed.

    Attributes:
        names: the L layer names (group labels); ``("all",)`` for model-wise mixing.
        trainable: canonical floating parameter keys (forward inputs that receive gradients).
        buffers: floating buffer keys (mixed, no gradient).
        fixed: integer keys (taken from the first model).
        aliases: ``{alias key: canonical key}`` for tied parameters.
        group: ``{floating key: layer index}``; -1 means "mean over layers" (a buffer without a parameter).
    """

    names: tuple[str, ...]
    trainable: tuple[str, ...]
    buffers: tuple[str, ...]
    fixed: tuple[str, ...]
    aliases: dict[str, str] = field(default_factory=dict)
    group: dict[str, int] = field(default_factory=dict)

    @property
    def mixed(self) -> tuple[str, ...]:
        """Keys whose tensors are combined across models: ``trainable + buffers``."""
        return self.trainable + self.buffers

    @property
    def forward_keys(self) -> tuple[str, ...]:
        """Keys to hand to ``torch.func.functional_call`` (no aliases)."""
        return self.trainable + self.buffers + self.fixed

    def __len__(self) -> int:
        return len(self.names)

    def complete(self, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """A full state dict (aliases filled in) from one holding the canonical keys."""
        out = dict(state)
        for alias, canonical in self.aliases.items():
            out[alias] = out[canonical]
        return out


def _module_of(key: str) -> str:
    return key.rsplit(".", 1)[0] if "." in key else ""


def layer_map(model: nn.Module, layerwise: bool = True, grouping: Grouping = None) -> LayerMap:
    """Build the :class:`LayerMap` of ``model`` (see the module docstring for the rule)."""
    full = model.state_dict(keep_vars=True)
    canonical = {id(p): n for n, p in model.named_parameters(remove_duplicate=True)}
    canonical.update({id(b): n for n, b in model.named_buffers(remove_duplicate=True) if id(b) not in canonical})
    params = {n for n, _ in model.named_parameters(remove_duplicate=True)}
    aliases, trainable, buffers, fixed = {}, [], [], []
    for key, tensor in full.items():
        name = canonical.get(id(tensor), key)
        if name != key:
            aliases[key] = name
        elif not tensor.is_floating_point():
            fixed.append(key)
        elif key in params:
            trainable.append(key)
        else:
            buffers.append(key)

    if not layerwise:
        labels = {k: "all" for k in trainable}
    elif grouping is None:
        labels = {k: k for k in trainable}
    elif grouping == "module":
        labels = {k: _module_of(k) or k for k in trainable}
    elif callable(grouping):
        labels = {k: str(grouping(k)) for k in trainable}
    else:
        raise ValueError(f"grouping must be None, 'module' or a callable, got {grouping!r}")
    names = tuple(dict.fromkeys(labels.values())) or ("all",)
    index = {name: i for i, name in enumerate(names)}
    group = {k: index[labels[k]] for k in trainable}
    first_param_of_module: dict[str, int] = {}
    for k in trainable:
        first_param_of_module.setdefault(_module_of(k), group[k])
    for k in buffers:
        group[k] = 0 if not layerwise else first_param_of_module.get(_module_of(k), -1)
    return LayerMap(names, tuple(trainable), tuple(buffers), tuple(fixed), aliases, group)
