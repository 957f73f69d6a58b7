r"""Divergence :math:`\operatorname{tr}(\partial f / \partial z)` of the CNF dynamics.

Two estimators, as in FFJORD (Grathwohl et al., 2019, Sec. 3.1):

* exact: from the Jacobian that a network propagates in forward mode along with its output
  (:meth:`~pyro_ffjord.nets.ODENet.forward_and_jacobian`), else all D rows of the Jacobian from
  one batched vector-Jacobian product;
* Hutchinson: :math:`\operatorname{tr}(J) = \mathbb{E}_\epsilon[\epsilon^\top J \epsilon]`
  with one Jacobian-vector product propagated forward by the network, else one VJP, for noise
  with :math:`\mathbb{E}[\epsilon\epsilon^\top] = I`.

Both return the rows they computed so that the Jacobian regularizer reuses them.
"""

from __future__ import annotations

import torch
from torch import Tensor


def sample_noise(like: Tensor, kind: str) -> Tensor:
    """Draws Hutchinson noise shaped like ``like``: Rademacher (±1) or standard Gaussian."""
    if kind == "gaussian":
        return torch.randn_like(like)
    return torch.randint_like(like, 0, 2).mul_(2).sub_(1)


def divergence_hutchinson(f: Tensor, z: Tensor, noise: Tensor, create_graph: bool) -> tuple[Tensor, Tensor]:
    r"""Hutchinson estimate :math:`\epsilon^\top (\partial f/\partial z) \epsilon` per sample.

    Args:
        f: dynamics evaluated at ``z``, shape ``(N, D)``.
        z: state that requires grad, shape ``(N, D)``.
        noise: :math:`\epsilon`, shape ``(N, D)``.
        create_graph: keep the graph of the VJP (needed to differentiate the estimate).

    Returns:
        The estimate, shape ``(N,)``, and the VJP :math:`\epsilon^\top J`, shape ``(N, D)``.
    """
    (e_jac,) = torch.autograd.grad(f, z, noise, create_graph=create_graph)
    return (e_jac * noise).sum(-1), e_jac


def divergence_exact(f: Tensor, z: Tensor, create_graph: bool) -> tuple[Tensor, Tensor]:
    r"""Exact trace :math:`\sum_i \partial f_i / \partial z_i` from one batched VJP over the basis.

    Args:
        f: dynamics evaluated at ``z``, shape ``(N, D)``.
        z: state that requires grad, shape ``(N, D)``.
        create_graph: keep the graph of the VJPs.

    Returns:
        The trace, shape ``(N,)``, and the Jacobian rows, shape ``(D, N, D)``.
    """
    n, d = z.shape
    basis = torch.eye(d, dtype=z.dtype, device=z.device).unsqueeze(1).expand(d, n, d)
    (rows,) = torch.autograd.grad(f, z, basis, create_graph=create_graph, is_grads_batched=True)
    return rows.diagonal(dim1=0, dim2=2).sum(-1), rows


def divergence_from_jacobian(jacobian: Tensor) -> tuple[Tensor, Tensor]:
    """Exact trace from the Jacobian (or its transpose) ``(N, D, D)``; also returns it as ``(D, N, D)``."""
    return jacobian.diagonal(dim1=-2, dim2=-1).sum(-1), jacobian.transpose(0, 1)


def divergence_hutchinson_jvp(jvp: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
    r"""Hutchinson estimate :math:`\epsilon^\top (J \epsilon)` from a Jacobian-vector product ``(N, D)``.

    Returns the estimate ``(N,)`` and :math:`J \epsilon`, whose squared norm is, like that of
    :math:`\epsilon^\top J`, an unbiased estimate of :math:`\lVert J \rVert_F^2`.
    """
    return (jvp * noise).sum(-1), jvp
