"""Data scaling as an invertible Pyro transform, so that a density fit in scaled units is reported in the data's."""

from __future__ import annotations

import torch
from pyro.distributions.transforms import AffineTransform, LowerCholeskyAffine
from torch import Tensor


def standardization(x: Tensor, whiten: bool = True) -> AffineTransform | LowerCholeskyAffine:
    r"""The affine map from unit scale to the data, fit on training rows ``x``.

    With ``whiten``, :math:`x = \mu + L y` where :math:`L L^\top` is the sample covariance (Cholesky
    whitening: ``y`` has identity covariance); otherwise :math:`x = \mu + \sigma \odot y` per column.
    Use it as the last transform of the flow and feed ``t.inv(x)`` to :func:`~pyro_ffjord.flow_matching_loss`.

    .. math:: \log p_X(x) = \log p_Y(L^{-1}(x - \mu)) - \sum_i \log L_{ii}

    Args:
        x: training rows, shape ``(N, D)`` with ``N >= 2``.
        whiten: full-covariance (Cholesky) whitening, else per-column standardization.

    Returns:
        A Pyro ``LowerCholeskyAffine`` (``whiten``) or an ``AffineTransform`` with ``event_dim=1``.

    Example:
        >>> x = torch.randn(500, 3) @ torch.tensor([[2.0, 0, 0], [1, 1, 0], [0, 0, 3]]) + 5
        >>> t = standardization(x)
        >>> torch.cov(t.inv(x).T).diagonal()
        tensor([1.0000, 1.0000, 1.0000])
    """
    if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[0] < 2:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be a tensor of training rows (N, D) with N >= 2, got {got}")
    if not torch.isfinite(x).all():
        raise ValueError("x contains NaN or inf")
    mean = x.mean(0)
    if not whiten:
        std = x.std(0)
        if not (std > 0).all():
            raise ValueError(f"x has constant columns {(std == 0).nonzero().flatten().tolist()}; drop them first")
        return AffineTransform(mean, std, event_dim=1)
    covariance = torch.atleast_2d(torch.cov(x.T.double()))
    scale_tril, info = torch.linalg.cholesky_ex(covariance)
    if info != 0:
        raise ValueError("x has a singular covariance (collinear or constant columns); drop them or use whiten=False")
    return LowerCholeskyAffine(mean, scale_tril.to(x.dtype))
