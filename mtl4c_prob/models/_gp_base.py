"""What the single-task Gaussian processes share: inputs, kernel, mean effects, noise."""

from __future__ import annotations

import logging
import weakref
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule

from mtl4c_prob.data import DrugResponseData, TensorData
from mtl4c_prob.exceptions import NumericalWarning, warn_external
from mtl4c_prob.inference import SVIConfig
from mtl4c_prob.models._base import ProbabilisticModel
from mtl4c_prob.models._kernels import (
    CellDrugKernel,
    DrugInputChoice,
    check_kernel_options,
    identity_inputs,
)
from mtl4c_prob.models._mf import _fresh
from mtl4c_prob.models._packing import Layout

logger = logging.getLogger(__name__)

DRUG_INPUTS = ("auto", "features", "identity", "both")
GP_NOISE = ("task", "drug")
#: Rows whose cross-covariances are formed at once (bounds memory at O(M * CHUNK)).
CHUNK = 16384


class _Inducing(PyroModule):
    """Inducing inputs: point-estimated parameters, or fixed buffers, by block name."""

    def __init__(self, blocks: dict[str, torch.Tensor], learned: dict[str, bool]) -> None:
        super().__init__(name="inducing")
        self.names = list(blocks)
        for name, value in blocks.items():
            if learned[name]:
                setattr(self, name, torch.nn.Parameter(value))
            else:
                self.register_buffer(name, value)

    def forward(self) -> dict[str, torch.Tensor]:
        """Return the inducing inputs by block (reading a parameter records its site)."""
        return {name: getattr(self, name) for name in self.names}

    def learned(self) -> dict[str, bool]:
        """Which blocks are optimised."""
        return {name: isinstance(getattr(self, name), torch.nn.Parameter) for name in self.names}


class _GPBase(DrugInputChoice, ProbabilisticModel):
    """What both GPs share: inputs, kernel, mean effects, noise, jittered Cholesky."""

    requires_cell_features = True
    #: Whether drug effects are latent sites (sparse GP) or part of the kernel (exact GP).
    _latent_drug_effects = True

    def _init_common(self, **options: Any) -> None:
        check_kernel_options(options["kernel"], options["composite"])
        if options["drug_input"] not in DRUG_INPUTS:
            raise ValueError(
                f"drug_input must be one of {DRUG_INPUTS}, got {options['drug_input']!r}"
            )
        if options["noise"] not in GP_NOISE:
            raise ValueError(f"noise must be one of {GP_NOISE}, got {options['noise']!r}")
        for arg, value in options.items():
            if arg.endswith(("_loc", "_scale", "_spread")) or arg == "jitter":
                if not value > 0:
                    raise ValueError(f"{arg} must be positive, got {value}")
                value = float(value)
            setattr(self, arg, value)
        self.ard = bool(self.ard)

    # ------------------------------------------------------------ inputs
    def _prepare(self, train: DrugResponseData) -> None:
        self._layout_cache, self._drug_inputs = None, {}
        self._auto_drug = train.drug_features is not None
        super()._prepare(train)

    def _restore(self, state, path, device) -> None:
        self._auto_drug = (path / "drug_features.parquet").is_file()
        self._layout_cache, self._drug_inputs = None, {}
        super()._restore(state, path, device)

    def _fit_joint(self, train, val, config) -> None:
        self._fit_seed = config.seed
        super()._fit_joint(train, val, config)

    def _dims(self) -> tuple[int, int, int]:
        """Widths of the cell, drug-feature and drug-identity input blocks."""
        drug = self.drug_table_.shape[1] if self.drug_table_ is not None else 0
        identity = int(self.seen_drugs_.sum()) + 1 if self._uses_identity() else 0
        return self.cell_table_.shape[1], drug, identity

    def _inputs(self, data: TensorData) -> tuple[torch.Tensor, torch.Tensor]:
        """Cell inputs (n_cells, P) and drug inputs (n_drugs, D' + J') of ``data``.

        The drug inputs are cached per drug feature table (the same tensor object in
        every step), so that the kernels can keep their distances between steps.
        """
        cache = self.__dict__.setdefault("_drug_inputs", {})
        key = (data.n_drugs, str(data.device))
        hit = cache.get(key)
        if hit is not None and (
            hit[0] is None and data.drug_x is None or (hit[0] and hit[0]() is data.drug_x)
        ):
            return data.cell_x, hit[1]
        parts = []
        if self.drug_table_ is not None:
            parts.append(data.drug_x)
        if self._uses_identity():
            parts.append(identity_inputs(self.seen_mask("drug", data.n_drugs, data.device)))
        drug_in = torch.cat(parts, dim=1)
        ref = None if data.drug_x is None else weakref.ref(data.drug_x)
        cache.clear()
        cache[key] = (ref, drug_in)
        return data.cell_x, drug_in

    def _build_kernel(self, reference: dict[str, float]) -> None:
        self.reference_ = dict(reference)
        self.kernel_ = CellDrugKernel(
            *self._dims(),
            kernel=self.kernel,
            composite=self.composite,
            ard=self.ard,
            reference=reference,
            lengthscale_prior_loc=self.lengthscale_prior_loc,
            lengthscale_prior_scale=self.lengthscale_prior_scale,
            variance_prior_loc=self.variance_prior_loc,
            variance_prior_scale=self.variance_prior_scale,
        ).to(self.device_)

    def _train_rows(self, train: DrugResponseData, device: torch.device) -> dict:
        data = self._tensors(train, device, with_y=True)
        return {"data": data, "task": data.task, "cell": data.cell, "drug": data.drug}

    # ----------------------------------------------------------- latents
    def _layouts(self) -> dict[str, Layout]:
        """Blocks of the packed sites ``z`` (standard normals) and ``scales`` (half-normals)."""
        if getattr(self, "_layout_cache", None) is not None:
            return self._layout_cache
        T, J = self.n_tasks_, self.n_drugs_
        deviations = self.multitask and T > 1
        z, sc = Layout(), Layout()
        z.add("offset")
        if T > 1:
            z.add("task_offset_z", T)
            sc.add("task_offset_sd", scale=self.offset_scale)
        if self._latent_drug_effects:
            z.add("drug_z", J)
            if deviations:
                z.add("drug_task_z", T, J)
        sc.add("drug_bias_sd", scale=self.bias_scale)
        if deviations:
            sc.add("drug_bias_task_sd", T, scale=self.task_scale)
        if self.cell_effects:
            if self._latent_drug_effects:
                z.add("cell_z", self.n_cells_)
            sc.add("cell_bias_sd", scale=self.bias_scale)
        sc.add("noise_sd", T, scale=self.noise_scale)
        if self.noise == "drug":
            z.add("drug_noise_z", T, J)
            sc.add("drug_noise_spread", scale=self.noise_spread)
        self._layout_cache = {"z": z, "scales": sc}
        return self._layout_cache

    def init_loc_fn(self, site: dict) -> torch.Tensor:
        """Start latents at zero, scales small, noise at 0.5, hyperparameters at prior medians."""
        name = site["name"]
        if name in ("z", "scales"):
            layout = self._layouts()[name]
            if name == "z":
                return torch.zeros(layout.size)
            init = torch.full((layout.size,), 0.1)
            for block, value in (("noise_sd", 0.5), ("drug_bias_sd", 0.5), ("cell_bias_sd", 0.3)):
                if block in layout:
                    init[layout.blocks[block][0]] = value
            return init
        if name == "u":
            return torch.zeros(site["fn"].shape())
        fn = site["fn"]
        while hasattr(fn, "base_dist"):
            fn = fn.base_dist
        if isinstance(fn, dist.LogNormal):
            return fn.loc.exp().expand(site["fn"].shape())
        return super().init_loc_fn(site)

    def unpack_sites(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Named blocks of the packed ``z`` and ``scales`` sites; other sites as they are."""
        layouts, out = self._layouts(), {}
        for site, value in values.items():
            out.update(layouts[site].unpack(value) if site in layouts else {site: value})
        return out

    def _effects(self, data: TensorData) -> tuple:
        """Sample the packed sites; return them with task offsets (T,) and log noise sd.

        The log noise sd has shape (n_tasks, n_drugs or 1).
        """
        layouts, dev = self._layouts(), data.device
        z_all = pyro.sample(
            "z", dist.Normal(torch.zeros(layouts["z"].size, device=dev), 1.0).to_event(1)
        )
        sc_all = pyro.sample(
            "scales", dist.HalfNormal(layouts["scales"].scale_tensor(dev)).to_event(1)
        )
        z, sc = layouts["z"].unpack(z_all), layouts["scales"].unpack(sc_all)
        offset = self.offset_scale * z["offset"].expand(self.n_tasks_)
        if "task_offset_z" in z:
            offset = offset + sc["task_offset_sd"] * z["task_offset_z"]
        log_noise = torch.log(sc["noise_sd"])[:, None]
        if "drug_noise_z" in z:
            eta = _fresh(z["drug_noise_z"], self.seen_mask("drug", data.n_drugs, dev), 1)
            log_noise = log_noise + sc["drug_noise_spread"] * eta
        return z, sc, offset, log_noise

    def _cholesky(self, K: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """Lower Cholesky factor of ``K``, with jitter that grows tenfold if it fails.

        With ``inplace=True`` (``K`` without gradients) the jitter is added to ``K``'s
        diagonal in place, so that only the factor is allocated besides ``K``.
        """
        base = self.jitter * K.diagonal().mean().detach()
        eye = None if inplace else torch.eye(K.shape[-1], device=K.device, dtype=K.dtype)
        added = 0.0
        for attempt in range(4):
            if inplace:
                K.diagonal().add_(base * 10**attempt - added)
                added = base * 10**attempt
                L, info = torch.linalg.cholesky_ex(K)
            else:
                L, info = torch.linalg.cholesky_ex(K + base * 10**attempt * eye)
            if int(info) == 0:
                if attempt and not getattr(self, "_jitter_warned", False):
                    self._jitter_warned = True
                    warn_external(
                        f"Cholesky needed jitter {float(base) * 10**attempt:.2e}; the covariance "
                        "is nearly singular (duplicate inputs, or a very long lengthscale)",
                        NumericalWarning,
                    )
                return L
        raise torch.linalg.LinAlgError(
            f"Cholesky failed with jitter up to {float(base) * 1000:.2e}: standardise the "
            "features, raise jitter or noise_scale, or check for duplicate cell lines"
        )

    def _rows_input(self, inputs: tuple, c: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """Concatenated input rows [cell, drug] of rows with codes ``c``, ``d``."""
        return torch.cat([inputs[0][c], inputs[1][d]], dim=1)

    def _fit_guard(self, config: SVIConfig | None, config_kwargs: dict) -> None:
        if config is None and config_kwargs.get("batch_size", 0) is None:
            config_kwargs.pop("batch_size")
