"""``gradfit.fit_many``: fit-many from Python, on files, in-memory tables or Dask DataFrames."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from gradfit.errors import OptionError
from gradfit.model.composite import parse_composite
from gradfit.model.models import Model, get_builtin
from gradfit.results.batch_result import BatchResult


def fit_many(
    data: Any,
    *,
    group: str,
    x: str,
    y: str,
    model: Model | str,
    sigma: str | None = None,
    engine: str = "local",
    client: Any = None,
    workers: int | None = None,
    scheduler: str | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    resume: bool = False,
    chunk_size: int | None = None,
    progress: bool = False,
    **fit_options: Any,
) -> BatchResult:
    """Fit ``model`` to every group of a long-form table: one result row per group.

    Args:
        data: a path (CSV/TSV/Parquet/npz file, a folder of Parquet files, a glob), a
            ``pyarrow.Table``, a pandas DataFrame or a Dask DataFrame (its partitions are
            computed one at a time, on the workers with ``engine="dask"``).
        group, x, y, sigma: column names (the group key, the curve's x and y, y's errors).
        model: a ``Model``, a built-in name, a composite (``"gaussian(prefix=p1_) + linear"``)
            or an expression in ``x``'s column name.
        engine: ``"local"`` (this process, streamed) or ``"dask"`` (``client``, the
            ``scheduler`` address, or a new ``LocalCluster`` of ``workers`` processes).
        out: also write the result there (``.parquet``/``.csv``, or a folder ending in ``/``);
            the groups come in their first-seen order (a folder: part by part). Without it
            the parts go to a temporary folder here: a cluster on other machines needs an
            ``out`` on a filesystem its workers share.
        fit_options: as ``fit_batch`` takes them (loss, optimizer, p0, bounds, fixed, ...).

    Returns:
        The ``BatchResult``, its ``keys`` the groups (``result.summary()`` says how it went).

    Example:
        >>> import pyarrow as pa, numpy as np
        >>> t = np.linspace(0, 1, 5)
        >>> table = pa.table({"g": ["a"] * 5 + ["b"] * 5, "t": np.r_[t, t],
        ...                   "v": np.r_[2 * t + 1, -t]})
        >>> result = fit_many(table, group="g", x="t", y="v", model="linear")
        >>> result.keys.tolist(), result.params.numpy().round(6).tolist()
        (['a', 'b'], [[2.0, 1.0], [-1.0, 0.0]])
    """
    from gradfit.batch.many import run_fit_many  # torch loads here, not on import gradfit

    the_model = _model(model, x)
    common = dict(
        model=the_model, group=group, x=x, y=y, sigma=sigma, engine=engine, client=client,
        workers=workers, scheduler=scheduler, chunk_size=chunk_size, progress=progress,
        **fit_options,
    )  # fmt: skip
    if out is not None:
        result = run_fit_many(data, out=out, overwrite=overwrite, resume=resume, **common)
        assert result is not None  # no stop request can come from here
        return result
    with tempfile.TemporaryDirectory(prefix="gradfit-fit-many-") as folder:
        result = run_fit_many(data, out=Path(folder) / "result.parquet", **common)
    assert result is not None
    return result


def _model(model: Model | str, x: str) -> Model:
    """A model as the CLI reads ``--model``: built-in, composite, or an expression in ``x``."""
    if isinstance(model, Model):
        return model
    if not isinstance(model, str):
        raise OptionError(f"model must be a Model or a string, got {type(model).__name__}")
    builtin = get_builtin(model)
    if builtin is not None:
        return builtin
    composite = parse_composite(model, x)
    return composite if composite is not None else Model(model, independent=[x])
