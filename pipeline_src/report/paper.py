"""The published numbers, for the columns labelled as the paper's.

Every number here is typed in from a publication; none is ours. Each table says
where its numbers come from: the Duet paper took the LMT and BCP rows of its
Table 2 from BCP's paper (Lee et al. 2020) and the LocalBCP row from Huang et
al. 2021, and measured Tables 1 and 3 itself (PyTorch 2.0.0, one NVIDIA A40).
GloRo is not in the Duet paper's tables: its row's number is GloRo's own
(`GLORO`), labelled as such. Duet-local has no published number.
"""
from __future__ import annotations

DUET = "Duet paper"
LEE_2020 = "Lee et al. 2020 (BCP), via the Duet paper"
HUANG_2021 = "Huang et al. 2021 (LocalBCP), via the Duet paper"
PAPER_DEVICE = "NVIDIA A40"
# Leino et al. 2021 (GloRo, ICML), as its authors' repository states it: github.com/klasleino/gloro,
# README.md, "Best Results" (CIFAR-10, radius 0.141, 6C2F: VRA 0.600), which the authors call
# "more up-to-date" than, and possibly above, the paper's table. It gives no clean or PGD
# accuracy, so those cells stay empty.
GLORO = "GloRo's authors (Leino et al. 2021, klasleino/gloro README, Best Results), not the Duet paper"

# Table 1: rotation-matrix similarity (%) and Lipschitz constant.
TABLE1 = {
    "lmt": {"similarity": 51.6, "lipschitz": 19.9, "source": DUET},
    "bcp": {"similarity": 70.3, "lipschitz": 5.5, "source": DUET},
    "localbcp": {"similarity": 77.8, "lipschitz": 3.8, "source": DUET},
    "duet": {"similarity": 95.6, "lipschitz": 7.8, "source": DUET},
}

# Table 2: clean, PGD and certified accuracy (%) at l2 eps = 36/255. The Duet
# paper prints Duet's differences to BCP beside its numbers (+3.76 / -0.93).
TABLE2 = {
    "vanilla": {"clean": 90.06, "pgd": None, "certified": None, "source": DUET},
    "lmt": {"clean": 63.1, "pgd": 58.3, "certified": 38.1, "source": LEE_2020},
    "bcp": {"clean": 65.7, "pgd": 60.8, "certified": 51.3, "source": LEE_2020},
    "localbcp": {"clean": 70.7, "pgd": 64.8, "certified": 54.3, "source": HUANG_2021},
    "duet": {"clean": 69.46, "pgd": 61.8, "certified": 50.37, "source": DUET},
    "gloro": {"clean": None, "pgd": None, "certified": 60.0, "source": GLORO},
}

# Table 3: seconds per epoch and memory (GB) of training, on the paper's A40.
TABLE3 = {
    "lmt": {"seconds": 569.0, "memory_gb": 8.0, "source": DUET},
    "bcp": {"seconds": 14.8, "memory_gb": 3.2, "source": DUET},
    "localbcp": {"seconds": 67.8, "memory_gb": 40.3, "source": DUET},
    "duet": {"seconds": 38.5, "memory_gb": 5.1, "source": DUET},
}
