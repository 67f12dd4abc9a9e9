"""One interface for every certified training method (as CTBench wraps them):
a method turns a batch into worst-case logits z_hat at radius eps (and the
terms of its robust loss: `StepBounds`), may add a regulariser at every step,
and may carry state across steps (persistent power-iteration
vectors) that is checkpointed with the run. The training loop, schedules and
model selection live in `training/certified.py`; certification is a separate
stage (`certify/`).

Adding a method is three edits: a module here whose class is `@register`ed under
the method's name (the package imports every module of its folder), its params
block in params.yaml, and its block in workflow/schemas/params.schema.yaml with
the method's facts under `x-method` (label, pairing, similarity term, colour;
`runs.METHOD_FACTS` reads them, and the class reads them from there as `facts`).
docs/methods.md, "Adding a method", says more."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..bounds.lipschitz import PersistentPowerIteration
from ..runs import METHOD_FACTS, SCHEMA, MethodFacts
from ..models.architectures import CertifiableNet, CleanPass

METHODS: dict[str, type["CertifiedMethod"]] = {}


def register(cls: type["CertifiedMethod"]) -> type["CertifiedMethod"]:
    """Add a method to METHODS under its name, with its facts (`runs.METHOD_FACTS`, from
    its schema block's `x-method`) as `cls.facts`. A class that states a fact itself is
    refused: the schema block is the one place they are written."""
    facts = METHOD_FACTS.get(cls.name)
    if facts is None:
        raise TypeError(f"method '{cls.name}': no block of {SCHEMA} states its facts (x-method)")
    stated = sorted((set(MethodFacts._fields) | {"reads_guide"}) & set(vars(cls)))
    if stated:
        raise TypeError(f"method '{cls.name}' states {', '.join(stated)} in its class: write its facts "
                        f"once, in its block of {SCHEMA} (x-method)")
    cls.facts = facts
    METHODS[cls.name] = cls
    return cls


@dataclass
class StepBounds:
    """What a method computed for one batch: its worst-case logits and the terms of its
    robust loss (`training.certified.certified_loss` composes them)."""
    worst_logits: torch.Tensor          # z_hat (B, C), or (B, C + 1) with GloRo's bottom logit
    lipschitz: torch.Tensor             # product of the layer norms used (a scalar)
    # LocalBCP's sparsity term, its weight applied: added to the robust loss, or None.
    sparsity: torch.Tensor | None = None
    # GloRo's TRADES term lambda * KL, its weight applied: with it, the robust loss is
    # CE(z, y) + trades in place of CE(z_hat, y); None for the others.
    trades: torch.Tensor | None = None


class CertifiedMethod:
    name: str = ""
    # The certifier whose result is this method's headline number.
    certifier: str = ""
    # The method's facts (label, pairing, similarity term, colour), set by `register` from
    # its schema block: a method that is another plus a term (Duet: BCP plus the similarity
    # term) is paired with it: for a seed, both start from the same weights and see the same
    # batches, so their difference per seed is a paired measurement.
    facts: MethodFacts

    @classmethod
    def seed_family(cls) -> str:
        """The name the run's seeds are derived from (`training.common.stage_seed`)."""
        return cls.facts.paired_with or cls.name

    def __init__(self, model: CertifiableNet, cfg: dict, generator: torch.Generator, num_examples: int,
                 context: dict | None = None):
        """`context`: the run around the method (root, layout, device) for methods
        that read other stages' outputs (Duet reads the vanilla model)."""
        self.model, self.cfg = model, cfg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The clean logits of the batch. The pass is kept until `after_step`, so that
        bounds around this batch can reuse its activations (`clean_pass`)."""
        self._clean = (x, self._weights_version(), self.model.forward_trace(x))
        return self._clean[2].logits

    def _weights_version(self) -> tuple[int, ...]:
        return tuple(p._version for p in self.model.parameters())

    def clean_pass(self, x: torch.Tensor) -> CleanPass | None:
        """This step's clean pass, if `forward` ran on this very batch tensor and no
        weight has changed since (then the bounds recompute the centres)."""
        kept = getattr(self, "_clean", None)
        if kept is None or kept[0] is not x or kept[1] != self._weights_version():
            return None
        return kept[2]

    def regulariser(self, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor) -> torch.Tensor | None:
        """A loss term added at every step, warm-up included; None for none."""
        return None

    def bounds(self, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor, eps: float,
               index: torch.Tensor) -> StepBounds:
        """Worst-case logits of the batch (`index`: the examples' positions in the
        training set, for methods that keep per-example state)."""
        raise NotImplementedError

    def after_step(self) -> None:
        self._clean = None
        self.model.clamp_parameters_()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def build_method(name: str, model: CertifiableNet, cfg: dict, generator: torch.Generator,
                 num_examples: int, context: dict | None = None) -> CertifiedMethod:
    if name not in METHODS:
        raise ValueError(f"unknown certified method '{name}' (known: {', '.join(sorted(METHODS))})")
    return METHODS[name](model, cfg, generator, num_examples, context)


class GlobalNormMethod(CertifiedMethod):
    """A method that tracks each layer's spectral norm by power iteration with
    persistent vectors (`power_iterations` per step), checkpointed with the run."""

    def __init__(self, model, cfg, generator, num_examples, context=None):
        super().__init__(model, cfg, generator, num_examples, context)
        self.power = PersistentPowerIteration(model.weight_layers(), generator)

    def layer_norms(self) -> list[torch.Tensor]:
        return self.power.norms(self.model.weight_layers(), self.cfg["power_iterations"])

    def step_norms(self) -> list[torch.Tensor]:
        """This step's layer norms for the bound: one power-iteration step of the
        persistent vectors (a subclass that computed them already this step, as Duet's
        similarity term does, hands those over)."""
        return self.layer_norms()

    def state_dict(self):
        return {"power": self.power.state_dict()}

    def load_state_dict(self, state):
        self.power.load_state_dict(state["power"])
