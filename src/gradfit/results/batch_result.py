"""``BatchResult``: one row of parameters, errors and status per curve; Arrow/Parquet out."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from gradfit.io.files import write_text_atomic, write_with

Tensor = torch.Tensor

#: status codes shared with the LM kernel (``optim.lm.LMStatus``), plus batch-only ones, named
#: in the one vocabulary of ``fit``, ``fit_batch`` and ``fit-many`` (``status.STATUSES``);
#: ``BatchResult.messages`` says which test or limit stopped each curve
STATUS_NAMES = {
    0: "running",
    1: "converged",  # ftol
    2: "converged",  # xtol
    3: "converged",  # gtol
    4: "max_iter",
    5: "non_finite",
    6: "singular",
    7: "too_few_points",
    8: "diverged",  # first-order optimizers: the loss became non-finite
    9: "no_data",
}
MAX_ITER = 4
NON_FINITE = 5
TOO_FEW_POINTS = 7
DIVERGED = 8
NO_DATA = 9
CONVERGED = (1, 2, 3)
# what stopped a curve, beside its status word (the tolerances are the ones the fit used)
_MESSAGES = {
    0: "still running",
    1: "relative reduction of the cost below ftol",
    2: "relative step size below xtol",
    3: "gradient orthogonal to the residuals within gtol",
    5: "non-finite residuals or Jacobian at the starting point",
    6: "the damped normal equations could not be solved even at the largest damping",
    7: "fewer valid points than free parameters: not fitted",
    8: "the loss became non-finite; kept the best parameters seen",
    9: "no valid point (all omitted as NaN or inf): not fitted",
}
#: the columns every table has besides the key and the parameters (``columns()``)
_COLUMNS = ("loss", "reduced_chi2", "r2", "n_points", "n_iter", "status", "warnings")
_NAMES = np.array([STATUS_NAMES[code] for code in range(len(STATUS_NAMES))], dtype=object)
#: bits of ``BatchResult.warning_flags``
NOT_CONVERGED = 1  # any status but converged
NOT_ESTIMABLE = 2  # a free parameter's stderr is NaN (where a fit was made)


@dataclass
class BatchResult:
    """Per-curve results of ``gradfit.fit_batch`` (tensors with a leading ``K`` dimension).

    ``status`` holds integer codes; ``status_names`` spells them out (``converged``,
    ``max_iter``, ``diverged``, ``non_finite``, ``singular``, ``too_few_points``) and
    ``messages`` says more. ``stderr`` is NaN for fixed parameters and where the covariance
    cannot be estimated. ``warning_flags`` marks curves not to be trusted (cheap, vectorised);
    ``warnings(i)`` and the tables' ``warnings`` column turn them into sentences.
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
    fixed: tuple[str, ...] = ()  # fixed parameters: their NaN stderr is no warning

    def __len__(self) -> int:
        return self.params.shape[0]

    @property
    def converged(self) -> Tensor:
        """``[K]`` bool: the curve stopped on ftol, xtol or gtol."""
        return (self.status >= 1) & (self.status <= 3)

    @property
    def status_names(self) -> list[str]:
        return cast(list[str], self._status_array().tolist())

    def _status_array(self) -> np.ndarray:
        return cast(np.ndarray, _NAMES[self.status.cpu().numpy()])

    @property
    def messages(self) -> list[str]:
        """Per curve: what stopped it, in words (the status word not repeated)."""
        codes, n_iter = self.status.tolist(), self.n_iter.tolist()
        return [self._message(c, n) for c, n in zip(codes, n_iter, strict=True)]

    def _message(self, code: int, n_iter: int) -> str:
        if code == MAX_ITER:
            unit = "iterations" if self.optimizer == "lm" else "epochs"
            return f"stopped after the maximum of {n_iter} {unit}"
        if self.optimizer != "lm" and code in CONVERGED:
            return "relative loss change below tol"
        return _MESSAGES[code]

    @property
    def warning_flags(self) -> Tensor:
        """``[K]`` int: ``NOT_CONVERGED`` | ``NOT_ESTIMABLE`` bits; 0 where all is well."""
        not_converged, missing = self._flagged_parts()
        return not_converged.long() * NOT_CONVERGED + missing.any(-1).long() * NOT_ESTIMABLE

    def _flagged_parts(self) -> tuple[Tensor, Tensor]:
        """On the CPU: ``[K]`` not converged, ``[K, F]`` NaN stderr of the free parameters of
        curves that were fitted (too few points or a non-finite start estimate nothing)."""
        status = self.status.cpu()
        not_converged = (status < CONVERGED[0]) | (status > CONVERGED[-1])
        fitted = (status != TOO_FEW_POINTS) & (status != NON_FINITE) & (status != NO_DATA)
        free = [j for j, n in enumerate(self.param_names) if n not in self.fixed]
        missing = torch.isnan(self.stderr[:, free]).cpu() & fitted.unsqueeze(-1)
        return not_converged, missing

    def warnings(self, i: int) -> list[str]:
        """Curve ``i``'s warnings as plain sentences (empty when all is well)."""
        text = self.warning_texts(torch.tensor([i]))[0]
        return text.split("; ") if text else []

    def warning_texts(self, rows: Tensor | None = None) -> np.ndarray:
        """One string per curve (of ``rows``, default all): its warnings joined by "; ", ""
        when fine. Sentences are built once per distinct (status, limit, missing stderr)
        among the flagged curves, so a million curves cost a few vectorised passes."""
        not_converged, missing = self._flagged_parts()
        status, n_iter = self.status.cpu(), self.n_iter.cpu()
        if rows is not None:
            not_converged, missing = not_converged[rows], missing[rows]
            status, n_iter = status[rows], n_iter[rows]
        texts = np.full(status.shape[0], "", dtype=object)
        flagged = (not_converged | missing.any(-1)).nonzero().squeeze(-1)
        if flagged.numel() == 0:
            return texts
        status, n_iter = status[flagged], n_iter[flagged]
        limit = torch.where(status == MAX_ITER, n_iter, 0)  # the count only matters there
        key = torch.cat([status[:, None], limit[:, None], missing[flagged].long()], dim=1)
        distinct, inverse = _distinct_rows(key)
        sentences = np.array([self._sentence(row) for row in distinct], dtype=object)
        texts[flagged.numpy()] = sentences[inverse]
        return texts

    def _sentence(self, key: np.ndarray) -> str:
        code, n_iter, missing = int(key[0]), int(key[1]), key[2:].astype(bool)
        parts = []
        if code not in CONVERGED:
            parts.append(_status_warning(code, self._message(code, n_iter)))
        if missing.any():
            free = [n for n in self.param_names if n not in self.fixed]
            names = [n for n, m in zip(free, missing, strict=True) if m]
            parts.append(f"covariance not estimable for {', '.join(names)}")
        return "; ".join(parts)

    def __getitem__(self, i: int) -> dict[str, Any]:
        """Curve ``i`` as a plain record (params and stderr as name -> value)."""
        names = self.param_names
        return {
            "params": dict(zip(names, self.params[i].tolist(), strict=True)),
            "stderr": dict(zip(names, self.stderr[i].tolist(), strict=True)),
            "loss": float(self.loss[i]),
            "n_iter": int(self.n_iter[i]),
            "status": STATUS_NAMES[int(self.status[i])],
            "message": self._message(int(self.status[i]), int(self.n_iter[i])),
            "warnings": self.warnings(i),
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
        out["status"] = self._status_array()
        out["warnings"] = self.warning_texts()
        return out

    def to_arrow(self) -> Any:
        """A ``pyarrow.Table`` with one row per curve; its schema's ``gradfit`` metadata keeps
        what the columns do not (optimizer, loss, fixed parameters, the key column's name),
        so ``load`` rebuilds the result whole."""
        import pyarrow as pa

        table = pa.table(self.columns())
        return table.replace_schema_metadata({"gradfit": json.dumps(self._metadata())})

    def _metadata(self) -> dict[str, Any]:
        from gradfit.results.fit_result import versions

        return {
            "optimizer": self.optimizer,
            "loss_name": self.loss_name,
            "fixed": list(self.fixed),
            "key_name": self.key_name if self.keys is not None else None,
            "versions": versions(),
        }

    @classmethod
    def from_table(cls, table: Any, key_name: str | None = None) -> BatchResult:
        """A ``pyarrow.Table`` written by ``to_arrow`` (or fit-many) back as a result.

        The parameters are the columns with a ``<name>_stderr`` partner; the key column is
        ``key_name``, else the one the metadata names, else the first column when it is none
        of the result's own. Without metadata (a CSV), optimizer, loss and fixed parameters
        take their defaults; "converged" comes back as one code (which tolerance stopped a
        curve is not in the table).
        """
        import pyarrow as pa

        meta_bytes = (table.schema.metadata or {}).get(b"gradfit")
        meta: dict[str, Any] = json.loads(meta_bytes) if meta_bytes else {}
        codes = {name: code for code, name in STATUS_NAMES.items()}
        names = [c[: -len("_stderr")] for c in table.column_names if c.endswith("_stderr")]
        own = {*names, *(f"{n}_stderr" for n in names), *_COLUMNS}
        if key_name is None:
            key_name = meta.get("key_name")
        if key_name is None and table.column_names and table.column_names[0] not in own:
            key_name = table.column_names[0]

        def col(name: str) -> Tensor:
            column = table.column(name)
            if pa.types.is_null(column.type):  # a CSV column that is empty (all NaN)
                column = column.cast(pa.float64())
            return torch.as_tensor(np.array(column.to_numpy(zero_copy_only=False)))

        keys = None
        if key_name is not None:
            keys = table.column(key_name).to_numpy(zero_copy_only=False)
        return cls(
            params=torch.stack([col(n) for n in names], dim=1),
            stderr=torch.stack([col(f"{n}_stderr") for n in names], dim=1),
            loss=col("loss"), n_iter=col("n_iter"),
            status=torch.tensor([codes[s] for s in table.column("status").to_pylist()]),
            param_names=tuple(names), reduced_chi2=col("reduced_chi2"), r2=col("r2"),
            n_points=col("n_points"), optimizer=str(meta.get("optimizer", "lm")),
            loss_name=str(meta.get("loss_name", "mse")), keys=keys,
            key_name=key_name or "group", fixed=tuple(meta.get("fixed", ())),
        )  # fmt: skip

    @classmethod
    def load(cls, path: str | Path) -> BatchResult:
        """Read a table written by ``to_parquet``/``to_csv``/``save`` or ``gradfit fit-many``
        (``.parquet``/``.pq`` or ``.csv``) back (see ``from_table``)."""
        path = Path(path)
        if path.suffix.lower() == ".csv":
            import pyarrow.csv as pa_csv

            return cls.from_table(pa_csv.read_csv(path))
        import pyarrow.parquet as pq

        return cls.from_table(pq.read_table(path))

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

    @property
    def _index_name(self) -> str:
        """The name of the curve axis of ``to_pandas``/``to_xarray``: the key, else "curve"."""
        return self.key_name if self.keys is not None else "curve"

    def to_pandas(self) -> Any:
        """A ``pandas.DataFrame``, one row per curve, indexed by the group keys (named
        ``key_name``; without keys a 0..K-1 index named ``curve``). The columns are those of
        ``to_arrow``: each parameter, ``<name>_stderr``, loss, reduced_chi2, r2, n_points,
        n_iter, status (names) and warnings. Needs pandas (``pip install gradfit[pandas]``).
        """
        try:
            import pandas as pd
        except ImportError:
            raise ImportError(
                "to_pandas() needs pandas: pip install gradfit[pandas] (or pip install pandas)"
            ) from None
        frame = self.to_arrow().to_pandas()
        if self.keys is not None:
            return frame.set_index(self.key_name)
        frame.index = pd.RangeIndex(len(frame), name="curve")
        return frame

    def to_xarray(self) -> Any:
        """An ``xarray.Dataset`` with one dimension, the curves, named ``key_name`` with the
        group keys as its coordinate (without keys: ``curve``, 0..K-1).

        Its data variables are the table's columns, each a 1-D variable over that dimension:
        each parameter, ``<name>_stderr``, loss, reduced_chi2, r2, n_points, n_iter, status
        (names) and warnings; ``ds.to_dataframe()`` is ``to_pandas()``. ``attrs`` keep the
        optimizer, the loss and the fixed parameters. (One variable per parameter rather than a
        ``param`` dimension: parameters may differ in units and scale, and ``ds["a"]`` reads as
        ``result.params[:, j]``.) Needs xarray (``pip install gradfit[xarray]``).
        """
        try:
            import xarray as xr
        except ImportError:
            raise ImportError(
                "to_xarray() needs xarray: pip install gradfit[xarray] (or pip install xarray)"
            ) from None
        dim = self._index_name
        columns = self.columns()
        coord = columns.pop(self.key_name) if self.keys is not None else np.arange(len(self))
        attrs = {"optimizer": self.optimizer, "loss_name": self.loss_name}
        attrs["fixed"] = " ".join(self.fixed)  # a string: netCDF-safe, names have no spaces
        return xr.Dataset(
            {name: (dim, values) for name, values in columns.items()},
            coords={dim: coord},
            attrs=attrs,
        )

    def summary(self) -> str:
        """Counts by status and quantiles (5%, 50%, 95%) of each parameter over converged
        curves (first-order runs: also those that ran their epochs)."""
        names, counts = np.unique(self._status_array(), return_counts=True)
        counted = ", ".join(f"{n} {c}" for n, c in zip(names, counts, strict=True))
        lines = [f"{len(self)} curves: {counted}"]
        flags = self.warning_flags
        unestimable = int(((flags & NOT_ESTIMABLE) != 0).sum())
        if unestimable:
            lines.append(f"covariance not estimable for {unestimable} curves (see warnings)")
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

    def cat(name: str) -> Tensor:
        return torch.cat([getattr(r, name) for r in results])

    keys = None
    if first.keys is not None:
        keys = np.concatenate([np.asarray(r.keys) for r in results])
    return BatchResult(
        params=cat("params"), stderr=cat("stderr"), loss=cat("loss"), n_iter=cat("n_iter"),
        status=cat("status"), param_names=first.param_names, reduced_chi2=cat("reduced_chi2"),
        r2=cat("r2"), n_points=cat("n_points"), optimizer=first.optimizer,
        loss_name=first.loss_name, keys=keys, key_name=first.key_name, fixed=first.fixed,
    )  # fmt: skip


def _distinct_rows(rows: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(rows, axis=0, return_inverse=True)`` for ``[M, 2 + F]`` int rows (status,
    limit, missing flags), through one int64 per row where the bits fit: a 1-D sort instead of
    a row-wise one (0.1 s instead of 5 s for a million rows)."""
    F = rows.shape[1] - 2
    if F <= 24 and (rows[:, 1] < 2**32).all():
        bits = (rows[:, 2:] << torch.arange(F)).sum(-1) if F else torch.zeros_like(rows[:, 0])
        packed = rows[:, 0] | (bits << 4) | (rows[:, 1] << (4 + F))
        _, first, inverse = np.unique(packed.numpy(), return_index=True, return_inverse=True)
        return rows.numpy()[first], inverse.reshape(-1)
    distinct, inverse = np.unique(rows.numpy(), axis=0, return_inverse=True)
    return distinct, inverse.reshape(-1)


def _status_warning(code: int, message: str) -> str:
    """A status that is not "converged" as a warning sentence."""
    if code in (MAX_ITER, DIVERGED, 0):
        return f"not converged: {message}"
    return f"fit failed ({STATUS_NAMES[code]}): {message}"
