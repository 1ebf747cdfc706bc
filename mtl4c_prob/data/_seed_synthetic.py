"""Synthetic drug-response data with the original MTL4C ``SyntheticDataCreator`` API.

The seed toolkit shipped a synthetic data creator whose attributes (``data``,
``datasets``, ``cat_point``, ``trainRatings``, ``testRatings``) every walkthrough used.
This module re-implements it from its documentation so that those walkthroughs translate
line by line, and adds :meth:`SyntheticDataCreator.to_frame` to reach the long table of
the rest of the package.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pandas as pd

from mtl4c_prob.data._dataset import DrugResponseData

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["SyntheticDataCreator", "SyntheticDraw"]

logger = logging.getLogger(__name__)

_FUNCTIONS = ("gaussian", "cosine")
_SPLITS = ("train", "test")


class SyntheticDraw(NamedTuple):
    """One draw of a synthetic recipe.

    Attributes
    ----------
    cell_features : ndarray of shape (n_cells, n_cell_features)
        Features of the cells, shared by every task.
    drug_features : ndarray of shape (n_drugs, n_drug_features)
        Features of the drugs, shared by every task.
    responses : ndarray of shape (n_tasks, n_cells, n_drugs)
        Response of every cell x drug pair in every task, before sparsity and scaling.
    """

    cell_features: np.ndarray
    drug_features: np.ndarray
    responses: np.ndarray


def _check_int(name: str, value: Any, minimum: int) -> int:
    """Return ``value`` as an int, raising if it is not an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r}; pass an integer >= {minimum}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}; pass a larger value")
    return int(value)


def _check_fraction(value: Any) -> float:
    """Return ``value`` as a float strictly inside (0, 1), raising otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
        raise TypeError(f"test_split must be a float in (0, 1), got {value!r}")
    if not 0.0 < float(value) < 1.0:
        raise ValueError(
            f"test_split must lie strictly between 0 and 1, got {value}; pass e.g. 0.3"
        )
    return float(value)


def _check_noise(value: Any) -> float:
    """Return ``value`` as a finite non-negative float, raising otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
        raise TypeError(f"noise must be a non-negative float, got {value!r}")
    if not np.isfinite(value) or value < 0:
        raise ValueError(f"noise must be finite and >= 0, got {value}; pass e.g. 0.1")
    return float(value)


def _random_correlation(rng: np.random.Generator, dim: int) -> np.ndarray:
    """Draw a well-conditioned random correlation matrix of shape (dim, dim)."""
    factor = rng.standard_normal((dim, dim))
    cov = factor @ factor.T / dim + 0.5 * np.eye(dim)
    scale = 1.0 / np.sqrt(np.diag(cov))
    return cov * scale[:, None] * scale[None, :]


def _gaussian_vectors(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    """Draw ``n`` vectors from a zero-mean Gaussian with a random correlation."""
    chol = np.linalg.cholesky(_random_correlation(rng, dim))
    return rng.standard_normal((n, dim)) @ chol.T


def _n_rounded(fraction: float, n: int) -> int:
    """Return ``floor(fraction * n + 0.5)``, i.e. round half up."""
    return int(np.floor(fraction * n + 0.5))


class SyntheticDataCreator:
    """Create synthetic multitask drug-response data (the seed toolkit's API).

    Status: stable

    Every task measures the same ``cellsPerTask`` cells against the same
    ``drugsPerTask`` drugs; the tasks differ in how features map to responses.

    Parameters
    ----------
    num_tasks : int, default=1
        Number of tasks; they are named ``"0"``, ``"1"``, ...
    cellsPerTask : int, default=300
        Number of cells, the rows of every ratings matrix.
    drugsPerTask : int, default=10
        Number of drugs, the columns of every ratings matrix.
    function : {"gaussian", "cosine"}, default="gaussian"
        Recipe: :meth:`generateSynthData` or :meth:`generateCosSynthData`.
    normalize : bool, default=True
        Standardise the responses of each task to mean 0 and sd 1 over its observed
        pairs; the scaling is kept in ``y_mean`` and ``y_std``. Features are untouched.
    noise : float, default=0.1
        Task-specific noise; the larger, the less correlated the tasks.
    graph : bool, default=False
        Draw a figure of the generated responses into ``figure``.
    test_split : float, default=0.3
        Share of each task's observed pairs put in the test split, in (0, 1).
    **kwargs
        ``nfeatures`` (int or (int, int), default=5): features per cell and per drug,
        or (per cell, per drug). ``sparsityPct`` (float in [0, 100), default=0):
        percent of each task's cell x drug pairs removed. ``seed`` (int or None,
        default=0): seed of every random draw.

    Attributes
    ----------
    datasets : list of str
        Task names ``"0"``, ``"1"``, ...
    data : dict
        ``data[split][kind][name]`` with split ``"train"``/``"test"``; kind ``"x"`` is
        an ndarray of shape (n_obs, n_cell_features + n_drug_features), cell features
        then drug features, and kind ``"y"`` the ndarray of shape (n_obs,) responses.
        Rows are in row-major (cell, drug) order.
    cat_point : int
        Column of ``x`` where the drug features begin (= number of cell features).
    pairs : dict
        ``pairs[split][name]``: int ndarray of shape (n_obs, 2) of (cell, drug) indices
        of the rows of ``data[split]["x"][name]``.
    trainRatings, testRatings : dict of str to ndarray of shape (n_cells, n_drugs)
        Ratings matrices of each task, NaN where the pair is not in that split.
    true_ratings : dict of str to ndarray of shape (n_cells, n_drugs)
        Generated response of every pair, the pairs removed by sparsity included, on the
        scale of ``data``.
    y_mean, y_std : dict of str to float
        Per-task scaling: original response = ``y * y_std + y_mean``.
    cell_names, drug_names : list of str
        ``"cell_0007"``-style and ``"drug_03"``-style names.
    figure : matplotlib.figure.Figure or None
        The figure drawn when ``graph=True``.

    Raises
    ------
    ValueError
        If an argument is out of range or ``function`` is unknown.
    TypeError
        If an argument has the wrong type or an unknown keyword is passed.

    Notes
    -----
    Cells (and drugs) are shared across tasks: cell ``i`` has the same name and the same
    features in every task, as in real screens where one cell line is profiled once and
    tested in several datasets. This shared identity is what multitask models pool over.
    Sparsity removes pairs independently in each task, so tasks observe different pairs.

    Randomness flows from one ``numpy.random.SeedSequence(seed)`` split into three
    streams: the recipe, the sparsity masks and the train/test shuffles. Hence a change
    of ``sparsityPct`` keeps the responses, and a change of ``test_split`` keeps both.

    Examples
    --------
    >>> dataset = SyntheticDataCreator(num_tasks=3, cellsPerTask=40, drugsPerTask=5,
    ...                                function="cosine", noise=1, test_split=0.3)
    >>> dataset.prepare_data()
    >>> dataset.data["train"]["x"]["0"].shape
    (140, 10)
    """

    def __init__(
        self,
        num_tasks: int = 1,
        cellsPerTask: int = 300,  # noqa: N803
        drugsPerTask: int = 10,  # noqa: N803
        function: str = "gaussian",
        normalize: bool = True,
        noise: float = 0.1,
        graph: bool = False,
        test_split: float = 0.3,
        **kwargs: Any,
    ) -> None:
        self.num_tasks = _check_int("num_tasks", num_tasks, 1)
        self.cellsPerTask = _check_int("cellsPerTask", cellsPerTask, 1)
        self.drugsPerTask = _check_int("drugsPerTask", drugsPerTask, 1)
        if function not in _FUNCTIONS:
            raise ValueError(f"function must be one of {_FUNCTIONS}, got {function!r}")
        self.function = function
        self.normalize = bool(normalize)
        self.noise = _check_noise(noise)
        self.graph = bool(graph)
        self.test_split = _check_fraction(test_split)
        self._read_kwargs(kwargs)

        self.datasets = [str(t) for t in range(self.num_tasks)]
        self.cat_point = self.n_cell_features
        width = max(4, len(str(self.cellsPerTask - 1)))
        self.cell_names = [f"cell_{i:0{width}d}" for i in range(self.cellsPerTask)]
        width = max(2, len(str(self.drugsPerTask - 1)))
        self.drug_names = [f"drug_{j:0{width}d}" for j in range(self.drugsPerTask)]
        self._reset_outputs()

    def _read_kwargs(self, kwargs: dict[str, Any]) -> None:
        """Validate and store the optional keywords ``nfeatures``, ``sparsityPct``, ``seed``."""
        unknown = sorted(set(kwargs) - {"nfeatures", "sparsityPct", "seed"})
        if unknown:
            raise TypeError(
                f"unknown keyword arguments {unknown}; accepted: nfeatures, sparsityPct, seed"
            )

        nfeatures = kwargs.get("nfeatures", 5)
        pair = nfeatures if isinstance(nfeatures, (tuple, list)) else (nfeatures, nfeatures)
        if len(pair) != 2:
            raise ValueError(f"nfeatures must be an int or a pair of ints, got {nfeatures!r}")
        self.n_cell_features = _check_int("nfeatures", pair[0], 1)
        self.n_drug_features = _check_int("nfeatures", pair[1], 1)

        sparsity = kwargs.get("sparsityPct", 0)
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float, np.number)):
            raise TypeError(f"sparsityPct must be a number in [0, 100), got {sparsity!r}")
        if not 0 <= sparsity < 100:
            raise ValueError(f"sparsityPct must lie in [0, 100), got {sparsity}; pass e.g. 20")
        self.sparsityPct = float(sparsity)

        seed = kwargs.get("seed", 0)
        if seed is not None:
            seed = _check_int("seed", seed, 0)
        self.seed = seed
        self._entropy = np.random.SeedSequence(seed).entropy

    def _streams(self) -> list[np.random.Generator]:
        """Return fresh generators for the recipe, the sparsity masks and the splits."""
        children = np.random.SeedSequence(self._entropy).spawn(3)
        return [np.random.default_rng(child) for child in children]

    def _reset_outputs(self) -> None:
        """Empty every generated attribute."""
        self._draw: SyntheticDraw | None = None
        self._observed: dict[str, np.ndarray] = {}
        self.data: dict[str, dict[str, dict[str, np.ndarray]]] = {}
        self.pairs: dict[str, dict[str, np.ndarray]] = {}
        self.trainRatings: dict[str, np.ndarray] = {}
        self.testRatings: dict[str, np.ndarray] = {}
        self.true_ratings: dict[str, np.ndarray] = {}
        self.y_mean: dict[str, float] = {}
        self.y_std: dict[str, float] = {}
        self.figure: Figure | None = None

    def _require_data(self, what: str) -> SyntheticDraw:
        """Return the current draw, raising if :meth:`prepare_data` has not run."""
        if self._draw is None:
            raise ValueError(
                f"{what} needs generated data, but there is none yet; call prepare_data() first"
            )
        return self._draw

    def _n_cells_for(self, ptsPerTask: int | None) -> int:  # noqa: N803
        """Turn a number of points per task into a number of cells."""
        if ptsPerTask is None:
            return self.cellsPerTask
        pts = _check_int("ptsPerTask", ptsPerTask, self.drugsPerTask)
        if pts % self.drugsPerTask:
            raise ValueError(
                f"ptsPerTask must be a multiple of drugsPerTask={self.drugsPerTask}, got "
                f"{pts}; pass {pts - pts % self.drugsPerTask} or None"
            )
        return pts // self.drugsPerTask

    def generateSynthData(  # noqa: N802
        self,
        num_tasks: int = 1,
        ptsPerTask: int | None = None,  # noqa: N803
        noise: float = 0.1,
        graph: bool = False,
    ) -> SyntheticDraw:
        r"""Draw responses with the Gaussian recipe.

        Parameters
        ----------
        num_tasks : int, default=1
            Number of tasks to draw.
        ptsPerTask : int or None, default=None
            Number of cell x drug pairs per task, a multiple of ``drugsPerTask``; the
            grid has ``ptsPerTask // drugsPerTask`` cells. None means ``cellsPerTask``.
        noise : float, default=0.1
            Scale of the task-specific perturbation of the coefficients.
        graph : bool, default=False
            Draw a figure of the responses into ``figure``.

        Returns
        -------
        SyntheticDraw
            Cell features, drug features and responses of shape (n_tasks, n_cells, n_drugs).

        Notes
        -----
        Cell features :math:`c_i` and drug features :math:`d_j` are drawn from zero-mean
        Gaussians with random correlation matrices. With :math:`z_{ij} = (c_i, d_j)` of
        length :math:`D`, a common linear transformation
        :math:`h = z_{ij} W_t / \sqrt{D}`, :math:`W_t \in \mathbb{R}^{D \times 2}`, feeds
        one shared function

        .. math:: y_{tij} = \sin(h_0) + h_1 + h_0 h_1 / 2,

        with :math:`W_t = (W + \sigma E_t) / \sqrt{1 + \sigma^2}` and :math:`W, E_t` of
        iid standard normals, :math:`\sigma` = ``noise``. The coefficients of two tasks
        then correlate at :math:`1 / (1 + \sigma^2)` while keeping the same scale.
        """
        n_tasks = _check_int("num_tasks", num_tasks, 1)
        sigma = _check_noise(noise)
        n_cells = self._n_cells_for(ptsPerTask)
        rng = self._streams()[0]

        cells = _gaussian_vectors(rng, n_cells, self.n_cell_features)
        drugs = _gaussian_vectors(rng, self.drugsPerTask, self.n_drug_features)
        dim = self.n_cell_features + self.n_drug_features

        # Task coefficients W_t (n_tasks, dim, 2) around the shared W
        coef_shared = rng.standard_normal((dim, 2))
        coef_noise = rng.standard_normal((n_tasks, dim, 2))
        coef_tasks = (coef_shared + sigma * coef_noise) / np.sqrt(1.0 + sigma**2) / np.sqrt(dim)

        # h = c W_cell + d W_drug: (n_tasks, n_cells, n_drugs, 2)
        h_cell = np.einsum("if,tfk->tik", cells, coef_tasks[:, : self.n_cell_features])
        h_drug = np.einsum("jf,tfk->tjk", drugs, coef_tasks[:, self.n_cell_features :])
        h = h_cell[:, :, None, :] + h_drug[:, None, :, :]
        responses = np.sin(h[..., 0]) + h[..., 1] + 0.5 * h[..., 0] * h[..., 1]

        return self._finish_draw(SyntheticDraw(cells, drugs, responses), graph)

    def generateCosSynthData(  # noqa: N802
        self,
        num_tasks: int = 1,
        ptsPerTask: int | None = None,  # noqa: N803
        noise: float = 0.1,
        graph: bool = False,
    ) -> SyntheticDraw:
        r"""Draw responses with the cosine recipe.

        Parameters
        ----------
        num_tasks : int, default=1
            Number of tasks to draw.
        ptsPerTask : int or None, default=None
            Number of cell x drug pairs per task, a multiple of ``drugsPerTask``; the
            grid has ``ptsPerTask // drugsPerTask`` cells. None means ``cellsPerTask``.
        noise : float, default=0.1
            Standard deviation of the per-task noise added to each response.
        graph : bool, default=False
            Draw a figure of the responses into ``figure``.

        Returns
        -------
        SyntheticDraw
            Cell features, drug features and responses of shape (n_tasks, n_cells, n_drugs).

        Notes
        -----
        Each cell draws :math:`t_i \sim U(0, 1)` and each drug :math:`s_j \sim U(0, 1)`.
        Feature :math:`c = 1, \dots, D` places the point on the interval
        :math:`[2(c-1)\pi, 2c\pi]`: :math:`u_{ic} = 2\pi (t_i + c - 1)`, likewise
        :math:`v_{jc}` from :math:`s_j`. Features are one period apart, so every feature
        maps to the same response

        .. math:: y_{tij} = \cos u_{ic} + \cos v_{jc'} + \cos(u_{ic} - v_{jc'})
                  + \sigma \varepsilon_{tij}

        for any :math:`c, c'`, with :math:`\varepsilon_{tij}` iid standard normal and
        :math:`\sigma` = ``noise``. The noise-free part has variance 3/2, so two tasks
        correlate at about :math:`1.5 / (1.5 + \sigma^2)`. This is our reading of the
        seed's description ("scaled on intervals of :math:`2c\pi`, shifted by one
        period"); the features are perfectly dependent by design.
        """
        n_tasks = _check_int("num_tasks", num_tasks, 1)
        sigma = _check_noise(noise)
        n_cells = self._n_cells_for(ptsPerTask)
        rng = self._streams()[0]

        # Features one period apart: (n_cells, n_cell_features), (n_drugs, n_drug_features)
        t = rng.uniform(0.0, 1.0, n_cells)
        s = rng.uniform(0.0, 1.0, self.drugsPerTask)
        cells = 2 * np.pi * (t[:, None] + np.arange(self.n_cell_features)[None, :])
        drugs = 2 * np.pi * (s[:, None] + np.arange(self.n_drug_features)[None, :])

        # Noise-free response (n_cells, n_drugs), then per-task noise
        u, v = cells[:, -1], drugs[:, 0]
        clean = np.cos(u)[:, None] + np.cos(v)[None, :] + np.cos(u[:, None] - v[None, :])
        eps = rng.standard_normal((n_tasks, n_cells, self.drugsPerTask))
        responses = clean[None, :, :] + sigma * eps

        return self._finish_draw(SyntheticDraw(cells, drugs, responses), graph)

    def _finish_draw(self, draw: SyntheticDraw, graph: bool) -> SyntheticDraw:
        """Draw the figure when asked and return ``draw`` unchanged."""
        if graph:
            self.figure = _plot_responses(draw.responses)
        return draw

    def prepare_data(self) -> None:
        """Generate the responses, remove sparse pairs, scale and split.

        Runs the recipe chosen by ``function``, removes ``sparsityPct`` percent of each
        task's pairs (rounded half up), standardises each task when ``normalize`` and
        then calls :meth:`shuffle_and_split`. Calling it again gives the same data.
        """
        # Check that sparsity leaves enough pairs before drawing anything
        n_pairs = self.cellsPerTask * self.drugsPerTask
        n_removed = _n_rounded(self.sparsityPct / 100.0, n_pairs)
        if n_pairs - n_removed < 2:
            raise ValueError(
                f"sparsityPct={self.sparsityPct} leaves {n_pairs - n_removed} of {n_pairs} "
                "pairs per task, fewer than the 2 a split needs; lower sparsityPct or "
                "raise cellsPerTask"
            )

        if self.function == "gaussian":
            recipe = self.generateSynthData
        else:
            recipe = self.generateCosSynthData
        self._reset_outputs()
        draw = recipe(self.num_tasks, None, self.noise, self.graph)
        _, mask_rng, self._split_rng = self._streams()
        for t, name in enumerate(self.datasets):
            self._mask_and_scale(name, draw.responses[t], mask_rng, n_removed)

        self._draw = draw
        logger.info(
            "synthetic %s data: n_tasks=%d n_cells=%d n_drugs=%d n_obs/task=%d seed=%s",
            self.function,
            self.num_tasks,
            self.cellsPerTask,
            self.drugsPerTask,
            n_pairs - n_removed,
            self.seed,
        )
        self.shuffle_and_split()

    def _mask_and_scale(
        self, name: str, truth: np.ndarray, mask_rng: np.random.Generator, n_removed: int
    ) -> None:
        """Choose the observed pairs of one task and set its scaling from them."""
        # Observed pairs as sorted flat indices into (n_cells, n_drugs)
        keep = np.sort(mask_rng.permutation(truth.size)[n_removed:])
        self._observed[name] = keep

        observed = truth.ravel()[keep]
        mean, std = (observed.mean(), observed.std()) if self.normalize else (0.0, 1.0)
        std = std if std > 0 else 1.0
        self.y_mean[name], self.y_std[name] = float(mean), float(std)
        self.true_ratings[name] = (truth - mean) / std

    def create_x_and_y(self) -> None:
        """Prepare the data; alias of :meth:`prepare_data` kept from the seed."""
        self.prepare_data()

    def set_test_split(self, new_test_split: float) -> None:
        """Change the test fraction; re-split at once if data were generated.

        Parameters
        ----------
        new_test_split : float
            New share of each task's observed pairs put in the test split, in (0, 1).

        Raises
        ------
        ValueError
            If ``new_test_split`` is not strictly between 0 and 1.
        """
        self.test_split = _check_fraction(new_test_split)
        if self._draw is not None:
            self.shuffle_and_split()

    def shuffle_and_split(self) -> None:
        """Reshuffle each task's observed pairs and split them into train and test.

        ``n_test = floor(test_split * n_obs + 0.5)`` pairs per task go to test, kept
        within ``[1, n_obs - 1]``; rows stay in row-major (cell, drug) order, so
        ``data[split]["y"][name]`` equals the non-NaN entries of the split's ratings
        matrix read row by row. Each call draws a new shuffle from the seeded stream.

        Raises
        ------
        ValueError
            If :meth:`prepare_data` has not been called.
        """
        draw = self._require_data("shuffle_and_split()")
        self.data = {s: {"x": {}, "y": {}} for s in _SPLITS}
        self.pairs = {s: {} for s in _SPLITS}

        for name in self.datasets:
            observed = self._observed[name]
            n_test = min(max(_n_rounded(self.test_split, observed.size), 1), observed.size - 1)
            shuffled = self._split_rng.permutation(observed)
            chosen = {"test": np.sort(shuffled[:n_test]), "train": np.sort(shuffled[n_test:])}
            for split, flat in chosen.items():
                cell_idx, drug_idx = np.unravel_index(flat, self.true_ratings[name].shape)
                self.pairs[split][name] = np.column_stack([cell_idx, drug_idx])
                self.data[split]["x"][name] = np.hstack(
                    [draw.cell_features[cell_idx], draw.drug_features[drug_idx]]
                )
                y = draw.responses[int(name), cell_idx, drug_idx]
                self.data[split]["y"][name] = (y - self.y_mean[name]) / self.y_std[name]

            self.trainRatings[name] = self._ratings(name, "train")
            self.testRatings[name] = self._ratings(name, "test")

    def _ratings(self, name: str, split: str) -> np.ndarray:
        """Return the (n_cells, n_drugs) ratings matrix of one task and split."""
        ratings = np.full((self.cellsPerTask, self.drugsPerTask), np.nan)
        cell_idx, drug_idx = self.pairs[split][name].T
        ratings[cell_idx, drug_idx] = self.data[split]["y"][name]
        return ratings

    @property
    def cell_features(self) -> pd.DataFrame:
        """Cell features, a DataFrame of shape (n_cells, n_cell_features).

        Indexed by cell name; columns f0, f1, ...

        Raises
        ------
        ValueError
            If :meth:`prepare_data` has not been called.
        """
        draw = self._require_data("cell_features")
        columns = [f"f{k}" for k in range(self.n_cell_features)]
        index = pd.Index(self.cell_names, name="cell")
        return pd.DataFrame(draw.cell_features, index=index, columns=columns)

    @property
    def drug_features(self) -> pd.DataFrame:
        """Drug features, a DataFrame of shape (n_drugs, n_drug_features).

        Indexed by drug name; columns f0, f1, ...

        Raises
        ------
        ValueError
            If :meth:`prepare_data` has not been called.
        """
        draw = self._require_data("drug_features")
        columns = [f"f{k}" for k in range(self.n_drug_features)]
        index = pd.Index(self.drug_names, name="drug")
        return pd.DataFrame(draw.drug_features, index=index, columns=columns)

    def to_data(self) -> tuple[DrugResponseData, DrugResponseData]:
        """Return the current split as (train, test) :class:`DrugResponseData`.

        Both carry the cell and drug feature tables and share one code space, so any
        mtl4c_prob model can be fitted on the seed's data and compared with its
        walkthroughs.
        """
        frame = self.to_frame()
        tasks = list(self.datasets)
        cells, drugs = list(self.cell_names), list(self.drug_names)
        parts = []
        for split in ("train", "test"):
            rows = frame[frame["split"] == split].drop(columns="split")
            parts.append(
                DrugResponseData(
                    rows,
                    self.cell_features,
                    self.drug_features,
                    tasks=tasks,
                    cells=cells,
                    drugs=drugs,
                )
            )
        return parts[0], parts[1]

    def to_frame(self) -> pd.DataFrame:
        """Return the data as one long table, a row per observed (task, cell, drug).

        Returns
        -------
        pandas.DataFrame
            Columns ``task`` (str), ``cell`` (str), ``drug`` (str), ``y`` (float, on the
            scale of ``data``) and ``split`` (``"train"`` or ``"test"``), sorted by task,
            cell and drug.

        Raises
        ------
        ValueError
            If :meth:`prepare_data` has not been called.
        """
        self._require_data("to_frame()")
        cell_names = np.asarray(self.cell_names, dtype=object)
        drug_names = np.asarray(self.drug_names, dtype=object)
        pieces = []
        for name in self.datasets:
            for split in _SPLITS:
                cell_idx, drug_idx = self.pairs[split][name].T
                piece = pd.DataFrame(
                    {
                        "task": name,
                        "cell": cell_names[cell_idx],
                        "drug": drug_names[drug_idx],
                        "y": self.data[split]["y"][name],
                        "split": split,
                        "_order": cell_idx * self.drugsPerTask + drug_idx,
                    }
                )
                pieces.append(piece)
        frame = pd.concat(pieces, ignore_index=True)
        frame["_task"] = frame["task"].astype(int)
        frame = frame.sort_values(["_task", "_order"], kind="stable")
        return frame.drop(columns=["_task", "_order"]).reset_index(drop=True)


def _plot_responses(responses: np.ndarray) -> Figure:
    """Draw task 0's ratings matrix and task 0 against the others, without pyplot."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_matrix, ax_tasks = fig.subplots(1, 2)
    image = ax_matrix.imshow(responses[0, :50].T, aspect="auto", cmap="viridis")
    ax_matrix.set(xlabel="cell", ylabel="drug", title="task 0 responses (first 50 cells)")
    fig.colorbar(image, ax=ax_matrix)

    if responses.shape[0] == 1:
        ax_tasks.hist(responses[0].ravel(), bins=40)
        ax_tasks.set(xlabel="response", ylabel="pairs", title="task 0 responses")
    else:
        for t in range(1, responses.shape[0]):
            ax_tasks.scatter(responses[0].ravel(), responses[t].ravel(), s=4, label=f"task {t}")
        ax_tasks.set(xlabel="task 0 response", ylabel="other task", title="task agreement")
        ax_tasks.legend()
    return fig
