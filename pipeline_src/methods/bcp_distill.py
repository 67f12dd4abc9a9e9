"""BCP with the vanilla guide distilled into its clean logits (issue 22, candidate 3):
the guide's knowledge in function space, where Duet puts it in weight space.

    loss = kappa * CE(z, y) + (1 - kappa) * CE(z_hat, y) + beta * T^2 * KL(p_teacher^T || p^T)

p^T = softmax(z / T) of the certified model's clean logits z, p_teacher^T the teacher's at
the same temperature on the same augmented batch (Hinton et al. 2015; T^2 keeps the
gradient's scale independent of T). The term has its own weight `distill_weight` (beta),
constant through warm-up, ramp and decay: BCP's clean term kappa * CE(z, y) fades to
kappa_final = 0 by the end of the ramp, and a guide inside kappa's share would fade with it.

`distill_teacher` names the teacher:
  vanilla    the trained vanilla model (the guide; the method);
  untrained  the certified model's own initial weights, frozen (an untrained network of
             the same architecture: the no-guide control of the same term);
  labels     no network: the one-hot labels as p_teacher, i.e. beta * T^2 * CE(z / T, y)
             (the control that adds clean cross-entropy weight only: another point of
             BCP's own trade-off, which kappa_final also moves).
Paired with BCP: for a seed both start from the same weights and see the same batches;
beta = 0 trains BCP's weights bit for bit (tested). Certified by BCP's certificate."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from .base import register
from .bcp import BCP

TEACHERS = ("vanilla", "untrained", "labels")


def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor | None, y: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(logits / T)), batch mean; with no teacher
    logits, T^2 * CE(logits / T, y) (the one-hot labels as the teacher's distribution)."""
    log_student = F.log_softmax(logits / temperature, dim=1)
    if teacher_logits is None:
        return temperature ** 2 * F.nll_loss(log_student, y)
    log_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    return temperature ** 2 * F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)


@register
class BCPDistill(BCP):
    """BCP's bounds and certificate, plus the distillation term at every step."""
    name = "bcp_distill"
    certifier = "bcp"

    def __init__(self, model, cfg, generator, num_examples, context=None):
        super().__init__(model, cfg, generator, num_examples, context)
        teacher = cfg["distill_teacher"]
        if teacher not in TEACHERS:
            raise ValueError(f"{self.name}.distill_teacher: '{teacher}' is not one of {TEACHERS}")
        if teacher == "vanilla":
            if context is None or "guide" not in context:
                raise ValueError(f"{self.name} with distill_teacher: vanilla needs the vanilla model "
                                 "(context['guide'])")
            self.teacher = context["guide"]["model"]
        elif teacher == "untrained":
            # Built before any step: the run's initial weights (a resumed run rebuilds the same).
            self.teacher = copy.deepcopy(model).requires_grad_(False)
        else:
            self.teacher = None
        if self.teacher is not None:
            self.teacher.eval()

    def regulariser(self, x, y, logits):
        beta = self.cfg["distill_weight"]
        if beta == 0:
            return None
        teacher_logits = None
        if self.teacher is not None:
            with torch.no_grad():
                teacher_logits = self.teacher(x)
        return beta * distillation_loss(logits, teacher_logits, y, self.cfg["distill_temperature"])
