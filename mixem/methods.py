"""The method registry: each training method's head, objective, headline clustering and name, in one table.

Adding a method is one objective function plus one `register(Method(...))` line. The table is light
(objectives are named "module:function" and imported on use), so the CLI lists methods without torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from mixem.errors import ConfigError


@dataclass(frozen=True)
class Method:
    name: str  # the --method value, and the key in train_config.json
    display: str  # how results name the method
    head: str  # the model head it trains: one of config.HEADS (model.HEAD_TYPES builds it)
    # (out_view1, out_view2, TrainConfig, DistContext) -> {term name: tensor, ..., "loss": total to minimise};
    # a function, or "module:function" imported when first used
    objective: Callable | str
    headline_init: str  # k-means start of the headline row: "mixture" (the head's own groups) or "kmeans++"
    headline_how: str  # that clustering in words, for the result line

    def objective_fn(self) -> Callable:
        if callable(self.objective):
            return self.objective
        module, _, attr = self.objective.partition(":")
        return getattr(importlib.import_module(module), attr)

    @property
    def headline_name(self) -> str:
        return f"{self.display} ({self.headline_how})"


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    REGISTRY[method.name] = method
    return method


def get(name: str) -> Method:
    if name not in REGISTRY:
        raise ConfigError(f"unknown method {name!r}: choose one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


register(
    Method(
        "mixem",
        "MIX'EM",
        "mixture",
        "mixem.objectives:mixem_objective",
        "mixture",
        "k-means from the mixture components",
    )
)
register(
    Method("simclr", "SimCLR", "mixture", "mixem.objectives:simclr_objective", "kmeans++", "k-means++ on the embedding")
)
register(
    Method("ccp", "ccp", "centers", "mixem.objectives:ccp_objective", "mixture", "k-means from the predicted centres")
)
