"""Duet on local Lipschitz bounds: LocalBCP (Huang et al. 2021) plus Duet's
similarity term, the extension the Duet paper points to in its discussion of
Table 2 ("directly calculates the global Lipschitz constant and can still be
extended to incorporate" local bounds):

    loss = kappa CE(z, y) + (1 - kappa) CE(z_hat_LocalBCP, y) + lambda * loss_sim

LocalBCP's worst-case logits, its clipped-ReLU network and its sound local
certificate; the term is Duet's own (`duet.SimilarityTerm`, the same code and
the same keys, read from the `duet_local` block). The term's power-iteration
sigmas are the global norms LocalBCP's boxes use at that step, as Duet hands
them to BCP, so with lambda = 0 this is LocalBCP bit for bit (a test), and for
a seed both start from the same weights and see the same batches
(`paired_with: localbcp` in its schema block), so Duet-local - LocalBCP per seed is a paired difference."""
from __future__ import annotations

from .base import register
from .duet import SimilarityTerm
from .localbcp import LocalBCP


@register
class DuetLocal(SimilarityTerm, LocalBCP):
    """LocalBCP's bounds and certificate, plus the similarity regulariser."""
    name = "duet_local"
    certifier = "local"
