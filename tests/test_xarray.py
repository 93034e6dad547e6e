"""The xarray accessor: a cube fitted along one dimension equals fit_batch on its curves."""

import numpy as np
import pytest
import torch

import gradfit as gf
from gradfit.errors import DataError, ModelError, OptionError

xr = pytest.importorskip("xarray")
dask = pytest.importorskip("dask")
import gradfit.xarray  # noqa: E402  (registers DataArray.gradfit)


def _cube(seed=0, ny=6, nx=7, N=30):
    """Gaussians over (t, y, x), t first (not last), with missing points, one pixel without
    data and one with too few points; coordinates on every dimension and a 2-D one."""
    rng = np.random.default_rng(seed)
    t = np.linspace(-3, 3, N)
    a, c = rng.uniform(1, 3, (ny, nx)), rng.uniform(-1, 1, (ny, nx))
    w = rng.uniform(0.5, 1.2, (ny, nx))
    Y = a[..., None] * np.exp(-((t - c[..., None]) ** 2) / (2 * w[..., None] ** 2))
    Y += 0.05 * rng.standard_normal(Y.shape)
    Y[rng.random(Y.shape) < 0.1] = np.nan
    Y[1, 2] = np.nan
    Y[-1, -1, 2:] = np.nan
    return xr.DataArray(
        Y.transpose(2, 0, 1),
        dims=("t", "y", "x"),
        coords={
            "t": t, "y": np.arange(ny) * 0.5, "x": [f"col{i}" for i in range(nx)],
            "gain": (("y", "x"), rng.uniform(0.9, 1.1, (ny, nx))), "exposure": ("t", t + 5),
        },
        attrs={"units": "counts"},
    )  # fmt: skip


def _curves(cube):
    """The cube's curves as fit_batch takes them: (y, x) stacked in order, t last."""
    values = cube.transpose("y", "x", "t").values
    return values.reshape(-1, values.shape[-1])


def _assert_matches(ds, result, shape):
    for j, name in enumerate(result.param_names):
        np.testing.assert_array_equal(ds[name].values, result.params[:, j].reshape(shape))
        np.testing.assert_array_equal(
            ds[f"{name}_stderr"].values, result.stderr[:, j].reshape(shape)
        )
    for name in ("loss", "reduced_chi2", "r2", "n_points", "n_iter"):
        values = getattr(result, name).reshape(shape).numpy()
        np.testing.assert_array_equal(ds[name].values, values)
        assert ds[name].dtype == values.dtype
    assert ds["status"].values.ravel().tolist() == result.status_names
    assert ds["warnings"].values.ravel().tolist() == list(result.warning_texts())


def test_numpy_cube_equals_fit_batch():
    cube = _cube()
    ds = cube.gradfit.fit("gaussian", dim="t")
    want = gf.fit_batch("gaussian", np.array(cube["t"]), _curves(cube))  # index: read-only
    assert {"converged", "no_data", "too_few_points"} <= set(want.status_names)
    _assert_matches(ds, want, (6, 7))
    assert all(ds[v].dims == ("y", "x") for v in ds.data_vars)
    assert ds["x"].values.tolist() == cube["x"].values.tolist()
    np.testing.assert_array_equal(ds["gain"].values, cube["gain"].values)  # kept
    assert "exposure" not in ds.coords and "t" not in ds.dims  # they were along t
    assert ds.attrs["optimizer"] == "lm" and ds.attrs["loss"] == "mse"
    assert ds.attrs["model"] == gf.Model("gaussian").formula
    assert ds["status"].sel(y=0.5, x="col2").item() == "no_data"


def test_dask_cube_equals_numpy_cube_and_is_lazy(monkeypatch):
    from gradfit.batch import dask_arrays

    cube = _cube(seed=1)
    options = dict(p0={"width": 1.0}, bounds={"width": (0.05, 10)}, loss="soft_l1", f_scale=0.2)
    want = cube.gradfit.fit("gaussian", dim="t", **options)
    blocks = []
    real = dask_arrays.fit_block
    monkeypatch.setattr(dask_arrays, "fit_block", lambda y, **kw: blocks.append(y) or real(y, **kw))

    def refuse(*args, **kwargs):
        raise AssertionError("something was computed")

    chunked = cube.chunk({"y": 4, "x": 3, "t": 10})  # t is joined: a curve is fitted whole
    with dask.config.set(scheduler=refuse):
        lazy = chunked.gradfit.fit("gaussian", dim="t", **options)
        assert lazy["center"].chunks == ((4, 2), (3, 3, 1))
    assert blocks == []
    got = lazy.compute(scheduler="sync")
    assert sorted(b.shape for b in blocks) == sorted((a * b, 30) for a in (4, 2) for b in (3, 3, 1))
    xr.testing.assert_identical(got, want)
    with dask.config.set(scheduler="threads"):
        xr.testing.assert_identical(lazy.compute(), want)


def test_per_slice_x_sigma_and_p0_and_expression_in_dim_name():
    cube = _cube(seed=2, ny=3, nx=4, N=20)
    rng = np.random.default_rng(3)
    # x per pixel (another dimension order), sigma per point, p0 per pixel and a number
    x = cube["t"] + xr.DataArray(rng.uniform(0, 0.1, (4, 3)), dims=("x", "y"))
    sigma = xr.DataArray(rng.uniform(0.04, 0.06, 20), dims="t")
    center = xr.DataArray(rng.uniform(-0.5, 0.5, 3), dims="y")
    model = "A*exp(-(t - m)**2/(2*s**2)) + b"
    p0 = {"A": 2.0, "m": center, "s": 1.0, "b": 0.0}
    ds = cube.gradfit.fit(model, dim="t", x=x, sigma=sigma, p0=p0, absolute_sigma=True)
    curves = _curves(cube)
    X = x.transpose("y", "x", "t").values.reshape(curves.shape)
    P0 = np.column_stack([np.full(12, 2.0), np.repeat(center.values, 4), np.ones(12), np.zeros(12)])
    want = gf.fit_batch(
        gf.Model(model, independent="t"), X, curves, sigma=sigma.values, p0=P0, absolute_sigma=True
    )
    _assert_matches(ds, want, (3, 4))
    lazy = cube.chunk({"y": 2}).gradfit.fit(
        model, dim="t", x=x.chunk({"x": 2}), sigma=sigma, p0=p0, absolute_sigma=True
    )
    xr.testing.assert_identical(lazy.compute(scheduler="sync"), ds)


def test_one_dimensional_array_and_torch_threads_unchanged():
    t = np.linspace(0, 2, 25)
    line = xr.DataArray(3 * t - 1, dims="time", coords={"time": t})
    before = torch.get_num_threads()
    ds = line.chunk({"time": 5}).gradfit.fit("a*x + b").compute(scheduler="threads")
    assert torch.get_num_threads() == before
    assert ds["a"].dims == () and abs(ds["a"].item() - 3) < 1e-12 and ds["status"] == "converged"


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        (dict(model="gaussian", dim="time"), OptionError, "unknown dimension 'time'"),
        (dict(model="gaussian"), OptionError, "give dim="),
        (dict(model="gausian", dim="t"), ModelError, "gausian"),
        (dict(model="gaussian", dim="t", optimiser="lm"), OptionError, "did you mean 'optimizer'"),
        (dict(model="gaussian", dim="y"), DataError, "no coordinate"),
        (dict(model="gaussian", dim="t", x=np.arange(3.0)), DataError, "one value per point"),
        (dict(model="gaussian", dim="t", p0={"center": 1.0, "widht": 2}), OptionError, "widht"),
        (
            dict(model="gaussian", dim="t", p0={"center": xr.DataArray([0.0] * 6, dims="y")}),
            OptionError,
            "every parameter",
        ),
    ],
)
def test_bad_input_is_named(kwargs, error, words):
    cube = _cube(N=10).drop_vars("y")
    with pytest.raises(error) as raised:
        cube.gradfit.fit(**kwargs)
    assert words in str(raised.value)
