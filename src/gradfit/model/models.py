"""Models ``f(x, params)`` with named parameters: functions, expressions, built-ins, modules.

Python functions come in two forms: SciPy's ``f(x, a, k, c)``, whose signature names the
parameters (as ``curve_fit`` and lmfit read it), and the post's ``f(x, params)`` with the names
given as ``Model(f, params=[...])``.

Every model is called like the post's ``f(x, params)``. ``params`` is a tensor whose last
dimension holds the parameters in ``param_names`` order; leading dimensions are curves
(``[P]`` for one fit, ``[K, P]`` for ``K`` fits at once).
"""

from __future__ import annotations

import functools
import inspect
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from gradfit.errors import ModelError, OptionError
from gradfit.model import catalog
from gradfit.model import guesses as _guesses
from gradfit.model.expr import Expression, parse_expression
from gradfit.model.program import Program

Tensor = torch.Tensor
Variables = Tensor | Mapping[str, Tensor]
GuessFn = _guesses.Guess  # guess(x, y, mask=None) -> [..., P]


class Model:
    """A model ``f(x, params)`` with named parameters.

    Args:
        spec: an expression string (``"a*exp(-k*t)+c"``), a built-in name (``"gaussian"``,
            ``"polynomial3"``), a Python function (``f(x, a, k, c)`` or ``f(x, params)``, see
            below) or a ``torch.nn.Module``.
        params: parameter names of a function ``f(x, params)`` (required there), in the order
            ``f`` unpacks them; for an expression, the order of the parameter vector.
        independent: name(s) of the independent variable(s) in an expression.
        prefix: put in front of every parameter name (lmfit's convention), for an expression
            or a built-in: ``Model("gaussian", prefix="p1_")`` has ``p1_amplitude, ...``.

    Models combine with ``+ - * /`` into one expression model (``gradfit.model.composite``):
    ``Model("gaussian", prefix="p1_") + Model("linear")``. A parameter name in both operands
    is one shared parameter; a composite has no built-in guess (start it with ``p0``).

    Which form a function is in, read from its signature:

    * ``f(x, params)``, the vector form, when its only parameters are ``x`` and one named
      ``params``, ``p`` or ``theta``; or when ``params=`` is given and the signature does not
      list exactly those names after ``x`` (so any ``f(x, w)`` with ``params=`` works as before).
    * ``f(x, a, k, c)``, SciPy's form, otherwise: every positional parameter after ``x`` is a
      model parameter, in signature order (``p0`` as a sequence follows it). A numeric default
      (``c=0.0``) is that parameter's starting value (as in lmfit); others start at 1 (as in
      ``curve_fit``). Keyword-only parameters with defaults are left alone; ``*args``, required
      keyword-only parameters and non-numeric defaults are refused with a ``ModelError``.

    Example:
        >>> m = Model("a*x**2 + b*x + c")
        >>> m.param_names
        ('a', 'b', 'c')
        >>> m(torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 0.0, -1.0])).tolist()
        [-1.0, 0.0, 3.0]
        >>> def decay(t, a, k, c=0.0):
        ...     return a * torch.exp(-k * t) + c
        >>> Model(decay)
        Model('decay(t, a, k, c)', params=['a', 'k', 'c'])
    """

    #: a built-in's one-line description (set by ``_builtin``)
    description: str | None = None
    #: a function model's function as given, and whether it takes ``f(x, a, k, c)``
    _raw_fn: Callable[..., Any] | None = None
    _spread_form: bool = False
    #: whether that function is written in NumPy (see ``numerical``); None: not yet known
    _numpy: bool | None = None

    def __init__(
        self,
        spec: str | Callable[..., Tensor] | nn.Module,
        *,
        params: Sequence[str] | None = None,
        independent: str | Sequence[str] = "x",
        prefix: str = "",
    ) -> None:
        self.independent = (independent,) if isinstance(independent, str) else tuple(independent)
        self.expression: Expression | None = None
        self.module: nn.Module | None = None
        self.guess_fn: GuessFn | None = None
        self._fn: Callable[..., Tensor]
        self._defaults: tuple[float, ...] | None = None  # a SciPy-style function's starts
        if isinstance(spec, str) and (builtin := get_builtin(spec)) is not None:
            self.__dict__.update(builtin.__dict__)
        elif isinstance(spec, str):
            self._init_expression(spec, self.independent, params)
        elif isinstance(spec, nn.Module):
            self._init_module(spec)
        elif callable(spec):
            self._init_function(spec, params)
        else:
            raise ModelError(
                "a model is an expression, built-in name, function or nn.Module, "
                f"got {type(spec).__name__}"
            )
        if prefix:
            from gradfit.model.composite import apply_prefix

            apply_prefix(self, prefix)

    def _init_expression(
        self, text: str, independent: tuple[str, ...], params: Sequence[str] | None
    ) -> None:
        order = None if params is None else tuple(params)
        self.expression, self.param_names, self._value, self._value_and_derivatives = _compile(
            text, independent, order
        )
        self.formula = str(self.expression)
        self.name = self.formula

    def _init_module(self, module: nn.Module) -> None:
        self.module = module
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        if not named:
            raise ModelError("the nn.Module has no trainable parameters")
        self._shapes = [(n, p.shape) for n, p in named]
        self.param_names = tuple(
            n if p.numel() == 1 else f"{n}[{i}]" for n, p in named for i in range(p.numel())
        )
        self.formula = type(module).__name__
        self.name = self.formula

    def _init_function(self, fn: Callable[..., Tensor], params: Sequence[str] | None) -> None:
        self.name = getattr(fn, "__name__", type(fn).__name__)
        signature = _function_signature(fn, self.name, params)
        if signature is None:  # the vector form f(x, params)
            if params is None:
                raise ModelError(
                    f"{self.name}(x, params) takes its parameters as one vector: name them with "
                    "Model(f, params=[...]), or write f(x, a, b, ...) with one argument each"
                )
            if len(params) == 0 or len(set(params)) != len(params):
                raise ModelError(
                    f"parameter names must be unique and non-empty, got {list(params)}"
                )
            self._fn = self._raw_fn = fn
            self.param_names = tuple(params)
            self.formula = f"{self.name}(x, params)"
            return
        x_name, *names = signature.parameters
        self._fn, self._raw_fn, self._spread_form = _spread(fn), fn, True
        self.param_names = tuple(names)
        defaults = [signature.parameters[n].default for n in names]
        if any(d is not inspect.Parameter.empty for d in defaults):
            self._defaults = tuple(1.0 if d is inspect.Parameter.empty else d for d in defaults)
        self.formula = f"{self.name}({x_name}, {', '.join(names)})"

    # -- composites (gradfit.model.composite) ---------------------------------------------

    def __add__(self, other: object) -> Model:
        if not isinstance(other, Model):
            return NotImplemented
        return _combine(self, "+", other)

    def __sub__(self, other: object) -> Model:
        if not isinstance(other, Model):
            return NotImplemented
        return _combine(self, "-", other)

    def __mul__(self, other: object) -> Model:
        if not isinstance(other, Model):
            return NotImplemented
        return _combine(self, "*", other)

    def __truediv__(self, other: object) -> Model:
        if not isinstance(other, Model):
            return NotImplemented
        return _combine(self, "/", other)

    # -- evaluation -------------------------------------------------------------------------

    def __call__(self, x: Variables, params: Tensor) -> Tensor:
        """Evaluate ``f(x, params)``; ``params`` is ``[P]`` or ``[K, P]``."""
        if self.expression is not None:
            return self._call_expression(x, params)
        if self.module is not None:
            return self._call_module(x, params)
        if self.detect_numpy(x, params):
            return self._call_numpy(x, params)
        if params.dim() == 1:
            return self._fn(x, params)
        x_dim = 0 if isinstance(x, Tensor) and x.dim() == 2 else None
        return torch.func.vmap(self._fn, in_dims=(x_dim, 0))(x, params)

    # -- functions written in NumPy ---------------------------------------------------------

    @property
    def numerical(self) -> bool:
        """Whether this is a function written in NumPy, as ``curve_fit`` users write them
        (``a*np.exp(-k*x) + c``): it is evaluated on float64 arrays and differentiated by
        finite differences (:func:`finite_difference_jacobian`), never by autodiff. Known
        after its first evaluation (:meth:`detect_numpy`); False for every other model."""
        return bool(self._numpy)

    def detect_numpy(self, x: Variables, params: Tensor) -> bool:
        """Decide once, at the first evaluation, whether a function model is NumPy code.

        The rule: call it the torch way at ``params`` (one curve), with the parameters
        requiring gradients. A torch function returns a tensor. A NumPy function raises (NumPy
        refuses tensors that require gradients, and ``torch.exp`` refuses arrays) or returns
        an array; it is NumPy when, called with float64 arrays as ``curve_fit`` calls it, it
        then returns values. A function that fails both ways stays torch, so its own torch
        error is the one reported. Expressions and modules are never NumPy.
        """
        if self._raw_fn is None or self.expression is not None or self.module is not None:
            return False
        if self._numpy is None:
            # inside vmap/jacfwd: decide at the next plain call (a private torch check; a
            # torch without it simply decides now)
            wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
            if wrapped is not None and wrapped(params):
                return False
            self._numpy = _is_numpy_function(self, x, params)
        return self._numpy

    def _call_numpy(self, x: Variables, params: Tensor) -> Tensor:
        """A NumPy function on float64 arrays, curve by curve, as a tensor (no gradient)."""
        if params.requires_grad and torch.is_grad_enabled():
            raise OptionError(numpy_gradient_message(self.name))
        p = params.detach().cpu().to(torch.float64).numpy()
        values = _as_numpy(x)
        if p.ndim == 1:
            out = self._numpy_values(values, p)
        else:
            out = np.stack([self._numpy_values(_curve(values, k), p[k]) for k in range(len(p))])
        return torch.as_tensor(out, dtype=params.dtype, device=params.device)

    def _numpy_values(self, x: Any, p: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        assert self._raw_fn is not None
        out = self._raw_fn(x, *p) if self._spread_form else self._raw_fn(x, p)
        return np.asarray(out, dtype=np.float64)

    def _variables(self, x: Variables, params: Tensor) -> dict[str, Tensor]:
        if isinstance(x, Mapping):
            variables = dict(x)
            missing = [n for n in self.independent if n not in variables]
            if missing:
                raise ModelError(f"no values given for independent variable(s) {missing}")
        elif len(self.independent) == 1:
            variables = {self.independent[0]: x}
        else:
            raise ModelError(
                f"the model has independent variables {list(self.independent)}: pass x as a "
                "mapping name -> array"
            )
        if params.dim() == 2:  # contiguous columns: broadcasting a strided view is 4x slower
            columns = params.mT.contiguous().unsqueeze(-1).unbind(0)  # P x (K, 1)
        else:
            columns = params.unsqueeze(-1).unbind(-2)  # P views (..., 1): broadcast against x
        variables.update(zip(self.param_names, columns, strict=True))
        return variables

    def _shape(self, x: Variables, params: Tensor) -> tuple[int, ...]:
        # plain tuple arithmetic: torch.broadcast_shapes costs tens of microseconds per call
        shapes: list[tuple[int, ...]]
        shapes = [v.shape for v in x.values()] if isinstance(x, Mapping) else [x.shape]
        shapes.append((*params.shape[:-1], 1))
        ndim = max(len(s) for s in shapes)
        result = [1] * ndim
        for shape in shapes:
            for axis, size in enumerate(shape, start=ndim - len(shape)):
                if size != 1:
                    if result[axis] not in (1, size):
                        raise ModelError(f"x and params do not broadcast: {shapes}")
                    result[axis] = size
        return tuple(result)

    def _call_expression(self, x: Variables, params: Tensor) -> Tensor:
        assert self.expression is not None
        (out,) = self._value.run(self._variables(x, params))
        return _broadcast(out, self._shape(x, params), params)

    def jacobian(self, x: Variables, params: Tensor) -> tuple[Tensor, Tensor] | None:
        """``(f(x, params), ∂f/∂params)`` with shapes ``[..., N]`` and ``[..., N, P]``.

        Expressions differentiate symbolically once, so this costs a few fused tensor
        expressions instead of autodiff; NumPy functions (``numerical``) by finite
        differences; other models return None (use autodiff).
        """
        if self.detect_numpy(x, params):
            return finite_difference_jacobian(lambda p: self(x, p), params.detach())
        columns = self.value_and_derivatives(x, params)
        if columns is None:
            return None
        return columns[0], torch.stack(columns[1:], dim=-1)

    @property
    def programs(self) -> tuple[Program, Program] | None:
        """An expression's programs: its value, and its value with every derivative."""
        if self.expression is None:
            return None
        return self._value, self._value_and_derivatives

    def value_and_derivatives(self, x: Variables, params: Tensor) -> list[Tensor] | None:
        """``[f, ∂f/∂p_1, ..., ∂f/∂p_P]``, each ``[..., N]``, for expressions; else None.

        One straight-line program computes them all, sharing common subexpressions.
        """
        if self.expression is None:
            return None
        shape = self._shape(x, params)
        values = self._value_and_derivatives.run(self._variables(x, params))
        # constant derivatives come back as numbers or 0-d CPU tensors: place and broadcast them
        return [_broadcast(v, shape, params) for v in values]

    def _call_module(self, x: Variables, params: Tensor) -> Tensor:
        assert self.module is not None
        if not isinstance(x, Tensor):
            raise ModelError("an nn.Module model takes x as one array")
        if params.dim() > 1:
            call = torch.func.vmap(self._call_module, in_dims=(0 if x.dim() == 2 else None, 0))
            return call(x, params)
        tensors, start = {}, 0
        for name, shape in self._shapes:
            size = shape.numel()
            tensors[name] = params[start : start + size].reshape(shape)
            start += size
        column = x.dim() == 1  # curves are y(x): give the module a feature column
        out: Tensor = torch.func.functional_call(
            self.module, tensors, (x.unsqueeze(-1) if column else x,)
        )
        return out.squeeze(-1) if column and out.dim() == 2 and out.shape[-1] == 1 else out

    # -- starting values --------------------------------------------------------------------

    def initial_params(self, dtype: torch.dtype | None = None) -> Tensor | None:
        """A module's current parameters as one flat vector, a SciPy-style function's numeric
        defaults (1 where it has none), else None."""
        if self._defaults is not None:
            return torch.tensor(self._defaults, dtype=dtype or torch.float64)
        if self.module is None:
            return None
        flat = torch.cat(
            [p.detach().reshape(-1) for p in self.module.parameters() if p.requires_grad]
        )
        return flat.to(dtype) if dtype is not None else flat

    def guess(self, x: Variables, y: Tensor) -> Tensor | None:
        """Data-driven starting values ``[..., P]`` for built-ins, else None."""
        if self.guess_fn is None or not isinstance(x, Tensor):
            return None
        return self.guess_fn(x, y)

    def __repr__(self) -> str:
        return f"Model({self.formula!r}, params={list(self.param_names)})"


def _combine(left: Model, op: str, right: Model) -> Model:
    from gradfit.model.composite import combine

    return combine(left, op, right)


VECTOR_NAMES = ("params", "p", "theta")  # f(x, params): the second argument is the vector
_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _function_signature(
    fn: Callable[..., Tensor], name: str, params: Sequence[str] | None
) -> inspect.Signature | None:
    """SciPy form: the signature cut to ``x`` and the fitted parameters; None: vector form.

    The rule is in ``Model``'s docstring.
    """
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins and C functions hide their signature
        if params is None:
            raise ModelError(
                f"cannot read the signature of {name}; name its parameters with "
                "Model(f, params=[...]) for f(x, params)"
            ) from None
        return None
    every = list(signature.parameters.values())
    positional = [p for p in every if p.kind in _POSITIONAL]
    if len(positional) == 2 and positional[1].name in VECTOR_NAMES:
        return None
    listed = tuple(p.name for p in positional[1:])
    if params is not None and (not params or listed != tuple(params)):
        _check_vector_form(name, signature, listed)
        return None  # f(x, w) with its names given: the vector form, as before
    _check_scipy_form(name, signature, positional)
    return signature.replace(parameters=positional)


def _check_vector_form(name: str, signature: inspect.Signature, listed: tuple[str, ...]) -> None:
    """``params=`` given for a function that cannot be called as ``f(x, params)``."""
    try:
        signature.bind(None, None)
    except TypeError:
        raise ModelError(
            f"{name}{signature} takes its parameters one by one ({', '.join(listed)}): leave "
            "out params=, or list exactly those names"
        ) from None


def _check_scipy_form(
    name: str, signature: inspect.Signature, positional: list[inspect.Parameter]
) -> None:
    """Refuse what a parameter list cannot name: ``*args``, required keyword-only arguments,
    no parameter after ``x``, non-numeric defaults."""
    shown = f"{name}{signature}"
    every = list(signature.parameters.values())
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in every):
        raise ModelError(
            f"{shown}: *args cannot name the parameters; list them, def f(x, a, b): ..., "
            "or take one vector, f(x, params), with Model(f, params=[...])"
        )
    required = [
        p.name
        for p in every
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is inspect.Parameter.empty
    ]
    if required:
        raise ModelError(
            f"{shown}: keyword-only parameters ({', '.join(required)}) are not fitted and have "
            "no default; make them positional, def f(x, a, k), to fit them, or give defaults"
        )
    if len(positional) < 2:
        raise ModelError(
            f"{shown} has no parameters to fit: write f(x, a, b, ...) or f(x, params) with "
            "Model(f, params=[...])"
        )
    for p in positional[1:]:
        default = p.default
        if default is not inspect.Parameter.empty and not _is_number(default):
            raise ModelError(
                f"{shown}: parameter {p.name!r} has the non-numeric default {default!r}; every "
                "positional parameter after x is fitted (make it keyword-only to keep it out)"
            )


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _spread(fn: Callable[..., Tensor]) -> Callable[[Variables, Tensor], Tensor]:
    """``f(x, a, k, c)`` called as ``f(x, params)``: one 0-d tensor per parameter."""

    @functools.wraps(fn)
    def call(x: Variables, params: Tensor) -> Tensor:
        return fn(x, *params.unbind(-1))

    return call


def numpy_gradient_message(name: str) -> str:
    """Why a NumPy function cannot take a gradient-based optimizer, and the fixes."""
    return (
        f"the model {name} is written in NumPy, which has no gradients: fit it with "
        "optimizer='lm' (Levenberg–Marquardt, finite-difference Jacobian; the default for "
        "least-squares losses), or write it with torch (torch.exp instead of np.exp) or as an "
        "expression string ('a*exp(-k*x) + c') to use gd, sgd, adam or lbfgs"
    )


def _is_numpy_function(model: Model, x: Variables, params: Tensor) -> bool:
    """``Model.detect_numpy``'s rule, at one curve of ``params`` (and of ``x``)."""
    one = params.detach()
    if one.dim() == 2:
        one = one[0]
        if isinstance(x, Tensor) and x.dim() == 2:
            x = x[0]
    with torch.inference_mode(False), torch.enable_grad():
        xs: Variables = (
            {k: v.detach().clone() for k, v in x.items()}
            if isinstance(x, Mapping)
            else x.detach().clone()
        )
        p = one.clone().requires_grad_(True)
        try:
            out = model._fn(xs, p)
        except Exception:
            out = None
        if isinstance(out, Tensor):
            return False
    try:
        with np.errstate(all="ignore"):
            model._numpy_values(_as_numpy(x), one.cpu().to(torch.float64).numpy())
    except Exception:
        return False
    return True


def _as_numpy(x: Variables) -> Any:
    """``x`` (a tensor or a mapping of them) as float64 NumPy arrays."""
    if isinstance(x, Mapping):
        return {k: v.detach().cpu().to(torch.float64).numpy() for k, v in x.items()}
    return x.detach().cpu().to(torch.float64).numpy()


def _curve(x: Any, k: int) -> Any:
    """Curve ``k`` of a batch's ``x``: its row where ``x`` has one per curve, else ``x``."""
    if isinstance(x, Mapping):
        return {n: v[k] if v.ndim == 2 else v for n, v in x.items()}
    return x[k] if x.ndim == 2 else x


def finite_difference_jacobian(
    f: Callable[[Tensor], Tensor], params: Tensor
) -> tuple[Tensor, Tensor]:
    """``(f(params) [..., N], ∂f/∂params [..., N, P])`` by forward differences.

    The step is SciPy's ``least_squares`` rule (``_numdiff``, ``'2-point'``):
    ``h = sqrt(eps)·max(|p|, 1)``, which is MINPACK's (``curve_fit``'s) relative step
    ``sqrt(eps)·|p|`` without its failure at ``p = 0`` and with a floor for small parameters;
    the difference is divided by the step actually taken (``(p + h) - p``, exact in floating
    point). Forward differences cost P + 1 evaluations, as ``curve_fit``'s, and are accurate
    to about ``sqrt(eps)`` relative, far below any parameter's standard error. Curves
    (leading dimensions) are independent, so each column is one call for all of them.
    """
    with torch.no_grad():
        f0 = f(params)
        h = torch.finfo(params.dtype).eps ** 0.5 * params.abs().clamp_min(1.0)
        columns = []
        for j in range(params.shape[-1]):
            shifted = params.clone()
            shifted[..., j] = params[..., j] + h[..., j]
            step = (shifted[..., j] - params[..., j]).unsqueeze(-1)
            columns.append((f(shifted) - f0) / step)
        return f0, torch.stack(columns, dim=-1)


def _broadcast(value: Tensor | float, shape: tuple[int, ...], like: Tensor) -> Tensor:
    if not isinstance(value, Tensor) or value.dim() == 0:
        # a constant (a derivative such as 1): a broadcast view, not a [K, N] fill per call
        one = torch.full((1,) * len(shape), float(value), dtype=like.dtype, device=like.device)
        return one.expand(shape)
    return value if tuple(value.shape) == shape else value.expand(shape)


@functools.lru_cache(maxsize=256)
def _compile(
    text: str, independent: tuple[str, ...], params: tuple[str, ...] | None
) -> tuple[Expression, tuple[str, ...], Program, Program]:
    """Parse, differentiate and compile once per expression: fits in a loop reuse the work.

    Returns the expression, the parameter order, and programs for the value alone and for the
    value with every derivative (which share their common subexpressions).
    """
    expression = parse_expression(text, independent)
    names = expression.param_names
    if params is not None:  # the caller chooses the order of the parameter vector
        if sorted(params) != sorted(names):
            raise ModelError(
                f"params {list(params)} do not match the expression's parameters {list(names)}"
            )
        names = params
    derivatives = [expression.diff(name).root for name in names]
    return (
        expression,
        names,
        Program([expression.root], independent),
        Program([expression.root, *derivatives], independent),
    )


def check_uses_independent(model: Model) -> None:
    """Refuse an expression without its independent variable: a misspelt or renamed variable
    (``a*x + b`` for data in ``t``) would silently make a constant model with a parameter x.

    Example:
        >>> check_uses_independent(Model("a*x + b", independent="t"))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        gradfit.errors.ModelError: the model a*x + b does not use the independent variable 't'; ...
    """
    if model.expression is None or set(model.independent) & set(model.expression.names):
        return
    wanted = " or ".join(repr(v) for v in model.independent)
    var = model.independent[0]
    raise ModelError(
        f"the model {model.formula} does not use the independent variable {wanted}; "
        f"write it in {var} (a constant as 'c + 0*{var}')"
    )


def as_model(model: Model | str | Callable[..., Tensor] | nn.Module, **kwargs: Any) -> Model:
    """Accept anything ``Model`` accepts, passing a ``Model`` through unchanged."""
    return model if isinstance(model, Model) else Model(model, **kwargs)


def _builtin(spec: catalog.Builtin) -> Model:
    """The built-in ``spec`` (its name, formula and parameters are in ``model/catalog.py``)
    with its starting guess: ``guesses.<name>``, or the least-squares polynomial."""
    guess: GuessFn
    if spec.degree is not None:
        guess = _guesses.polynomial(spec.degree)
    else:
        guess = getattr(_guesses, spec.name)
    model = Model(spec.formula, params=spec.params)
    model.name, model.guess_fn, model.description = spec.name, guess, spec.description
    return model


def linear() -> Model:
    """``a*x + b``, started from the exact least-squares line."""
    return _builtin(catalog.BUILTINS["linear"])


def polynomial(degree: int) -> Model:
    """``c0 + c1*x + ... + cd*x**d``, started from the exact least-squares polynomial.

    Example:
        >>> polynomial(2).param_names
        ('c0', 'c1', 'c2')
    """
    return _builtin(catalog.polynomial(degree))


def exponential() -> Model:
    """``a*exp(-k*x) + c``: decay (k > 0) or growth (k < 0) towards an offset."""
    return _builtin(catalog.BUILTINS["exponential"])


def gaussian() -> Model:
    """``amplitude*exp(-(x-center)**2/(2*width**2)) + offset``: a Gaussian peak."""
    return _builtin(catalog.BUILTINS["gaussian"])


def lorentzian() -> Model:
    """``amplitude*width**2/((x-center)**2 + width**2) + offset``: a Lorentzian peak."""
    return _builtin(catalog.BUILTINS["lorentzian"])


def logistic() -> Model:
    """``top/(1 + exp(-rate*(x - midpoint))) + bottom``: a sigmoid step."""
    return _builtin(catalog.BUILTINS["logistic"])


def power_law() -> Model:
    """``a*x**b`` for x > 0."""
    return _builtin(catalog.BUILTINS["power_law"])


def sine() -> Model:
    """``amplitude*sin(2*pi*frequency*x + phase) + offset``."""
    return _builtin(catalog.BUILTINS["sine"])


#: the built-ins by name, built from the one list in ``model/catalog.py``
BUILTINS: dict[str, Callable[[], Model]] = {
    name: functools.partial(_builtin, spec) for name, spec in catalog.BUILTINS.items()
}


def get_builtin(name: str) -> Model | None:
    """The built-in called ``name`` (``polynomialN``/``polyN`` for any degree), else None.

    Example:
        >>> get_builtin("poly3").param_names
        ('c0', 'c1', 'c2', 'c3')
    """
    spec = catalog.find(name)
    return None if spec is None else _builtin(spec)
