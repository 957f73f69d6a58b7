"""AutoFFJORD: an autoguide whose posterior over the whole unconstrained latent space is a CNF."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.distributions.torch_transform import ComposeTransformModule
from pyro.distributions.transforms import AffineTransform, ComposeTransform
from pyro.infer.autoguide import AutoNormalizingFlow, init_to_median
from pyro.infer.autoguide.initialization import InitMessenger
from pyro.nn import PyroParam
from pyro.poutine.runtime import am_i_wrapped
from torch import nn
from torch.distributions import Transform

from ._checks import check_int, check_number
from .transforms import ffjord


def _cnf_blocks(num_transforms: int, options: dict[str, Any], latent_dim: int) -> ComposeTransformModule:
    """``num_transforms`` FFJORD blocks on the packed latent (a module-level function: picklable)."""
    return ComposeTransformModule([ffjord(latent_dim, **options) for _ in range(num_transforms)])


class AutoFFJORD(AutoNormalizingFlow):
    r"""Autoguide with a free-form CNF posterior (Grathwohl et al., 2019) on the packed latent.

    .. math:: q(z) = \text{push-forward of } \mathcal{N}(0, I) \text{ by }
        u \mapsto \mu + \sigma \odot \phi_{\text{CNF}}(u),

    where :math:`\mu` starts at ``init_loc_fn``'s value (unlike ``AutoIAFNormal``) and :math:`\sigma` at
    ``init_scale``. An :class:`~pyro.infer.autoguide.AutoNormalizingFlow`: plates, vectorized particles, every ELBO
    of ``AutoIAFNormal`` and :class:`~pyro.infer.reparam.NeuTraReparam` work. With ``regularization`` the RNODE
    penalty of each solve enters every ELBO's loss as a ``pyro.factor`` on the guide.

    Defaults: two rk4 steps (``step_size=T/2``), ``adjoint=False``, ``divergence="exact"``, whose log-determinant
    is that of the numerical map, so :math:`q` is exactly the density of the samples drawn (D tangents per
    evaluation: pass ``divergence="hutchinson"`` for large latents). :meth:`get_transform` (NeuTra's potential)
    always uses the exact trace. See ``docs/guides.md``.

    Args:
        model: a Pyro model.
        hidden_dims: hidden widths of each CNF's dynamics network.
        num_transforms: number of stacked CNF blocks.
        init_loc_fn: per-site initialization of :math:`\mu` (see Pyro's autoguide initialization).
        init_scale: initial :math:`\sigma`.
        prefix: name of the guide in the param store (default: the class name).
        layer, activation: see :func:`~pyro_ffjord.ffjord`.
        **options: CNF options, see :class:`~pyro_ffjord.FFJORD`.

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> def model():
        ...     pyro.sample("x", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        >>> guide = AutoFFJORD(model, hidden_dims=(8,))
        >>> guide()["x"].shape
        torch.Size([2])
    """

    scale_constraint = constraints.softplus_positive

    def __init__(
        self,
        model: Callable,
        hidden_dims: Sequence[int] = (32, 32),
        num_transforms: int = 1,
        *,
        init_loc_fn: Callable = init_to_median,
        init_scale: float = 1.0,
        prefix: str | None = None,
        layer: str = "concat",
        activation: str = "silu",
        **options: Any,
    ) -> None:
        check_int("num_transforms", num_transforms)
        check_number("init_scale", init_scale)
        if prefix is not None and (not isinstance(prefix, str) or not prefix):
            raise ValueError(f"prefix must be a non-empty string, got {prefix!r}")
        defaults: dict[str, Any] = {"divergence": "exact", "adjoint": False}
        if "method" not in options:  # two rk4 steps (see above)
            defaults.update(method="rk4", options={"step_size": 0.5 * options.get("T", 1.0)})
        options = {**defaults, **options, "hidden_dims": hidden_dims, "layer": layer, "activation": activation}
        with torch.device("meta"):  # fail now rather than at the first guide call; meta draws no random numbers
            ffjord(1, **options)
        init_transform_fn = partial(_cnf_blocks, num_transforms, options)
        super().__init__(InitMessenger(init_loc_fn)(model), init_transform_fn)
        self._init_scale = float(init_scale)
        if prefix is not None:
            self._pyro_name = prefix

    def _setup_prototype(self, *args: Any, **kwargs: Any) -> None:
        super()._setup_prototype(*args, **kwargs)
        self.loc = nn.Parameter(self._init_loc())
        self.scale = PyroParam(torch.full_like(self.loc, self._init_scale), self.scale_constraint)
        self.transform = self._init_transform_fn(self.latent_dim).to(self.loc)

    def get_base_dist(self) -> dist.Distribution:
        """Standard normal on the packed latent, on the device and dtype of the guide."""
        return dist.Normal(torch.zeros_like(self.loc), 1.0).to_event(1)

    def _posterior_transform(self, blocks: Sequence[Transform], exact: bool) -> ComposeTransform:
        """The CNF ``blocks`` (the exact trace if ``exact``), then :math:`u \\mapsto \\mu + \\sigma \\odot u`."""
        # cache_size=1 lets log_prob of a fresh sample recover the CNF's output by identity,
        # so that the CNF answers from its own cache instead of solving again.
        affine = AffineTransform(self.loc, self.scale, event_dim=1, cache_size=1)
        return ComposeTransform([*(block.with_exact_trace() if exact else block for block in blocks), affine])

    def get_posterior(self, *args: Any, **kwargs: Any) -> dist.TransformedDistribution:
        """The guide's distribution as it is trained: its CNFs solve with the guide's own settings."""
        return dist.TransformedDistribution(
            self.get_base_dist(), self._posterior_transform(self.transform.parts, False)
        )

    def get_transform(self, *args: Any, **kwargs: Any) -> ComposeTransform:
        """:meth:`get_posterior`'s transform, with the exact trace: a deterministic log-determinant for HMC."""
        return self._posterior_transform(self.transform.parts, True)

    def sample_latent(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Samples the packed latent; under inference, adds the RNODE penalty of its solve as a guide factor."""
        blocks = self.transform.parts  # read once: every read registers the CNFs' parameters with Pyro again
        posterior = dist.TransformedDistribution(self.get_base_dist(), self._posterior_transform(blocks, False))
        before = [block.solutions for block in blocks]
        latent = pyro.sample(f"_{self._pyro_name}_latent", posterior, infer={"is_auxiliary": True})
        # A replayed or conditioned latent is not solved here: the last penalty would belong to another sample.
        solved = all(block.solutions is not old for block, old in zip(blocks, before))
        if solved and am_i_wrapped() and torch.is_grad_enabled() and any(block.flow.regularization for block in blocks):
            # A guide's log-density is subtracted from the ELBO, so +penalty here is +penalty in the loss.
            penalty = sum(block.regularization_loss() for block in blocks)
            pyro.factor(f"_{self._pyro_name}_regularization", penalty, has_rsample=True)
        return latent
