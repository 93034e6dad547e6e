"""``BatchResult``: one row of parameters, errors and status per curve; Arrow/Parquet out."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .files import write_text_atomic, write_with

Tensor = torch.Tensor

#: status codes shared with the LM kernel (``optim.lm.LMStatus``), plus batch-only ones
STATUS_NAMES = {
    0: "running",
    1: "converged_ftol",
    2: "converged_xtol",
    3: "converged_gtol",
    4: "max_iter",
    5: "non_finite",
    6: "singular",
    7: "too_few_points",
    8: "diverged",  # first-order optimizers: the loss became non-finite
}
TOO_FEW_POINTS = 7
DIVERGED = 8
CONVERGED = (1, 2, 3)


@dataclass
class BatchResult:
    """Per-curve results of ``gradfit.fit_batch`` (tensors with a leading ``K`` dimension).

    ``status`` holds integer codes; ``status_names`` spells them out (``converged_ftol``,
    ``max_iter``, ``non_finite``, ``singular``, ``too_few_points``, ...). ``stderr`` is NaN for
    fixed parameters and where the covariance cannot be estimated.
    """

    params: Tensor  # (K, P)
    stderr: Tensor  # (K, P)
    loss: Tensor  # (K,)
    n_iter: Tensor  # (K,)
    status: Tensor  # (K,) int codes
    param_names: tuple[str, ...]
    reduced_chi2: Tensor  # (K,)
    r2: Tensor  # (K,)
    n_points: Tensor  # (K,)
    optimizer: str = "lm"
    loss_name: str = "mse"
    keys: Any = field(default=None, repr=False)  # group keys, one per curve (fit-many)
    key_name: str = "group"

    def __len__(self) -> int:
        return self.params.shape[0]

    @property
    def converged(self) -> Tensor:
        """``[K]`` bool: the curve stopped on ftol, xtol or gtol."""
        return (self.status >= 1) & (self.status <= 3)

    @property
    def status_names(self) -> list[str]:
        return [STATUS_NAMES[int(code)] for code in self.status.tolist()]

    def __getitem__(self, i: int) -> dict[str, Any]:
        """Curve ``i`` as a plain record (params and stderr as name -> value)."""
        names = self.param_names
        return {
            "params": dict(zip(names, self.params[i].tolist(), strict=True)),
            "stderr": dict(zip(names, self.stderr[i].tolist(), strict=True)),
            "loss": float(self.loss[i]),
            "n_iter": int(self.n_iter[i]),
            "status": STATUS_NAMES[int(self.status[i])],
            "reduced_chi2": float(self.reduced_chi2[i]),
            "r2": float(self.r2[i]),
            "n_points": int(self.n_points[i]),
        }

    def columns(self) -> dict[str, np.ndarray]:
        """Column name -> NumPy array, in output order."""
        out: dict[str, np.ndarray] = {}
        if self.keys is not None:
            out[self.key_name] = np.asarray(self.keys)
        params, stderr = self.params.cpu().numpy(), self.stderr.cpu().numpy()
        for j, name in enumerate(self.param_names):
            out[name] = params[:, j]
        for j, name in enumerate(self.param_names):
            out[f"{name}_stderr"] = stderr[:, j]
        out["loss"] = self.loss.cpu().numpy()
        out["reduced_chi2"] = self.reduced_chi2.cpu().numpy()
        out["r2"] = self.r2.cpu().numpy()
        out["n_points"] = self.n_points.cpu().numpy()
        out["n_iter"] = self.n_iter.cpu().numpy()
        out["status"] = np.array(self.status_names, dtype=object)
        return out

    def to_arrow(self) -> Any:
        """A ``pyarrow.Table`` with one row per curve."""
        import pyarrow as pa

        return pa.table(self.columns())

    def to_parquet(self, path: str | Path) -> Path:
        """Write the table to Parquet atomically."""
        import pyarrow.parquet as pq

        table = self.to_arrow()
        return write_with(Path(path), lambda tmp: pq.write_table(table, tmp))

    def to_csv(self, path: str | Path) -> Path:
        """Write the table to CSV atomically."""
        import pyarrow.csv as pa_csv

        table = self.to_arrow()
        return write_with(Path(path), lambda tmp: pa_csv.write_csv(table, tmp))

    def to_pandas(self) -> Any:
        """A ``pandas.DataFrame`` (needs pandas installed)."""
        try:
            import pandas  # noqa: F401
        except ImportError:
            raise ImportError("to_pandas() needs pandas: pip install pandas") from None
        return self.to_arrow().to_pandas()

    def summary(self) -> str:
        """Counts by status and quantiles (5%, 50%, 95%) of each parameter over converged
        curves (first-order runs: also those that ran their epochs)."""
        names, counts = np.unique(np.array(self.status_names, dtype=object), return_counts=True)
        counted = ", ".join(f"{n} {c}" for n, c in zip(names, counts, strict=True))
        lines = [f"{len(self)} curves: {counted}"]
        usable, which = self.converged, "converged curves"
        if self.optimizer != "lm":  # a first-order run normally ends at its epoch limit
            usable, which = usable | (self.status == 4), "converged or max_iter curves"
        good = self.params[usable]
        if good.shape[0] > 0:
            q = torch.quantile(
                good.double(), torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64), dim=0
            )
            lines.append(f"parameter quantiles over {which} (5% / 50% / 95%):")
            for j, name in enumerate(self.param_names):
                lo, mid, hi = q[:, j].tolist()
                lines.append(f"  {name}: {lo:.6g} / {mid:.6g} / {hi:.6g}")
        return "\n".join(lines)

    def save(self, path: str | Path) -> Path:
        """Write by suffix: ``.parquet``/``.pq``, ``.csv``, or ``.json`` (records)."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix in (".parquet", ".pq"):
            return self.to_parquet(path)
        if suffix == ".csv":
            return self.to_csv(path)
        import json

        records = [self[i] for i in range(len(self))]
        return write_text_atomic(path, json.dumps(records) + "\n")


def concat(results: list[BatchResult]) -> BatchResult:
    """Join chunk results in order."""
    first = results[0]
    cat = lambda name: torch.cat([getattr(r, name) for r in results])  # noqa: E731
    keys = None
    if first.keys is not None:
        keys = np.concatenate([np.asarray(r.keys) for r in results])
    return BatchResult(
        params=cat("params"), stderr=cat("stderr"), loss=cat("loss"), n_iter=cat("n_iter"),
        status=cat("status"), param_names=first.param_names, reduced_chi2=cat("reduced_chi2"),
        r2=cat("r2"), n_points=cat("n_points"), optimizer=first.optimizer,
        loss_name=first.loss_name, keys=keys, key_name=first.key_name,
    )  # fmt: skip
