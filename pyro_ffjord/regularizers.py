r"""RNODE regularizers (Finlay et al., 2020, "How to train your neural ODE").

Both are integrated along the trajectory as extra ODE states and reuse what the dynamics
already computed:

.. math::

    \mathcal{K} = \int_0^T \lVert f(z(t), t) \rVert^2 \, dt, \qquad
    \mathcal{B} = \int_0^T \lVert \epsilon^\top \partial f / \partial z \rVert^2 \, dt,

where :math:`\mathbb{E}\lVert \epsilon^\top J \rVert^2 = \lVert J \rVert_F^2`.
"""

from __future__ import annotations

from torch import Tensor

REGULARIZERS = ("kinetic", "jacobian")


def kinetic_energy(f: Tensor) -> Tensor:
    """Squared speed :math:`\\lVert f \\rVert^2` per sample; ``f`` has shape ``(N, D)``."""
    return f.pow(2).sum(-1)


def jacobian_frobenius(jacobian_rows: Tensor) -> Tensor:
    """Squared Frobenius norm per sample from Jacobian rows shaped ``(N, D)`` or ``(D, N, D)``.

    With one Hutchinson row :math:`\\epsilon^\\top J` this is an unbiased estimate; with all D rows
    it is exact.
    """
    if jacobian_rows.dim() == 3:
        return jacobian_rows.pow(2).sum((0, 2))
    return jacobian_rows.pow(2).sum(-1)
