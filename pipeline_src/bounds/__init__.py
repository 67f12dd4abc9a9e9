"""Bounds on a network's outputs over an l2 ball of inputs, one module per
method (as auto_LiRPA keeps them): `ibp` (intervals), `lipschitz` (global
Lipschitz margin), `bcp` (ball and box together, Lee et al. 2020), `local`, `gloro`; and the sound
certifiers built on them (`certifiers`: by name, the relative-margin rule) and their
numerics (`numerics`: TF32 off, float64, guaranteed layer norms)."""
