"""One function per (library, method): ``fn(ctx, params) -> Solved``.

Each returns the iHVP s = (H + damping I)^-1 g_test as a flat (p,) tensor in influencekit's parameter order
(``ctx.torch_objective.space``), or, where the library only returns scores (kronfluence), its scores of all
n training points converted to I_up,loss. The driver times the whole call (fit + solve), so every row pays for
its own set-up (data loaders, factor fits), not for loading the workload.

Regularisation: influencekit's objectives carry the weight decay wd and the solvers add ``damping``; a peer
whose Hessian is that of the mean loss alone gets ``regularization = wd + damping`` (the same matrix).
Where a library's native score API exists, ``convention_*`` functions test what it returns on the first
``CONVENTION_POINTS`` training points against <s_exact, g_i> (fitted factor c: r_i = c <s_exact, g_i>).
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from influencekit.scores.influence import InfluenceFunction

from ihvp_family.solvers import build_solver
from ihvp_family.workloads import Spec

from .context import PeerContext

CONVENTION_POINTS = 64


@dataclass
class Solved:
    """A row's output: the iHVP (p,), or the library's own scores already converted to I_up,loss (n,)."""

    ihvp: torch.Tensor | None = None
    influence: torch.Tensor | None = None
    notes: dict[str, Any] = field(default_factory=dict)
    native: Callable[[], torch.Tensor] | None = None  # the library's own scores of the first CONVENTION_POINTS points


def _regularization(ctx: PeerContext) -> float:
    return ctx.weight_decay + ctx.damping


def _loader(ctx: PeerContext, batch_size: int, n: int | None = None) -> DataLoader:
    n = ctx.n if n is None else n
    return DataLoader(TensorDataset(ctx.x[:n], ctx.y[:n]), batch_size=batch_size, shuffle=False)


def _model_copy(ctx: PeerContext) -> nn.Module:
    return copy.deepcopy(ctx.model).eval()


def _flat_parameters(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


# -- influencekit ------------------------------------------------------------------------------------------------------
def influencekit(ctx: PeerContext, params: dict) -> Solved:
    """Any ``ihvp_family`` method (``params["method"]``: cg, lissa, arnoldi, kfac, ekfac, datainf, ...) on the
    generic ``TorchObjective`` (``closed_form: true``: W1's closed-form objective; ``objective_chunk``: the
    TorchObjective's chunk size, rebuilt inside the timed call, instead of the workload's)."""
    ctx.closed_form = bool(params.get("closed_form", False))
    if "objective_chunk" in params:
        ctx.cfg = {**ctx.cfg, "chunk_size": params["objective_chunk"]}
        ctx._torch_objective = None
    spec = Spec(ctx.name, params["method"], params.get("curvature", "hessian"), "peers", dict(params))
    solver, objective, notes = build_solver(ctx, spec)
    result = InfluenceFunction(objective, solver, allow_unconverged=True).inverse_hvp_of_test(ctx.test)
    if result.iterations is not None:
        notes["iterations"] = int(result.iterations[0])
    return Solved(ihvp=result.solution[0], notes=notes)


# -- dattri 0.3.0 (functional API: dattri.func.hessian) ----------------------------------------------------------------
def dattri_cg(ctx: PeerContext, params: dict) -> Solved:
    """``ihvp_at_x_cg`` on R over all n points in one batch: no tolerance, always ``max_iter`` iterations from x0 = v."""
    from dattri.func.hessian import ihvp_at_x_cg

    theta = ctx.torch_objective.parameters_vector()
    ihvp = ihvp_at_x_cg(lambda t: ctx.regularised_loss(t, ctx.x, ctx.y), theta, max_iter=params["max_iter"],
                        mode=params.get("mode", "rev-rev"), regularization=ctx.damping)
    return Solved(ihvp=ihvp(ctx.test_gradient())[0])


def dattri_lissa(ctx: PeerContext, params: dict) -> Solved:
    """``ihvp_at_x_lissa``: x <- v + (1 - d) x - H_B x / scaling; returns x / scaling = (H + d scaling I)^-1 v."""
    from dattri.func.hessian import ihvp_at_x_lissa

    theta = ctx.torch_objective.parameters_vector()
    scaling = params["scaling"]
    torch.manual_seed(0)
    # dattri sets requires_grad on every input, which integer labels refuse: pass them as floats, cast back inside
    ihvp = ihvp_at_x_lissa(lambda t, x, y: ctx.regularised_loss(t, x, y.long()), theta, ctx.x, ctx.y.to(ctx.dtype), in_dims=(None, 0, 0),
                           batch_size=params["batch_size"], num_repeat=params["repeats"],
                           recursion_depth=params["depth"], damping=ctx.damping / scaling, scaling=scaling)
    return Solved(ihvp=ihvp(ctx.test_gradient())[0])


def dattri_arnoldi(ctx: PeerContext, params: dict) -> Solved:
    """``ihvp_at_x_arnoldi``: top-``top_k`` eigenpairs from ``max_iter`` Arnoldi steps."""
    from dattri.func.hessian import ihvp_at_x_arnoldi

    theta = ctx.torch_objective.parameters_vector()
    torch.manual_seed(0)
    ihvp = ihvp_at_x_arnoldi(lambda t: ctx.regularised_loss(t, ctx.x, ctx.y), theta, max_iter=params["max_iter"],
                             top_k=params["top_k"], mode=params.get("mode", "rev-fwd"), regularization=ctx.damping)
    return Solved(ihvp=ihvp(ctx.test_gradient())[0])


# -- pyDVL 0.10.0 (pydvl.influence.torch) ------------------------------------------------------------------------------
def _pydvl(ctx: PeerContext, params: dict, make) -> Solved:
    """Fit a pyDVL influence model on the training loader; s = ``influence_factors(test)``; native = ``influences``."""
    model = _model_copy(ctx)
    influence = make(model)
    influence.fit(_loader(ctx, params["batch_size"]))
    ihvp = influence.influence_factors(*ctx.test)[0].detach()

    def native() -> torch.Tensor:
        return influence.influences(*ctx.test, ctx.x[:CONVENTION_POINTS], ctx.y[:CONVENTION_POINTS])[0].detach()

    return Solved(ihvp=ihvp, native=native)


def pydvl_cg(ctx: PeerContext, params: dict) -> Solved:
    from pydvl.influence.torch import CgInfluence

    return _pydvl(ctx, params, lambda m: CgInfluence(m, F.cross_entropy, regularization=_regularization(ctx), rtol=params["rtol"],
                                                      atol=0.0, maxiter=params.get("maxiter"), warn_on_max_iteration=False))


def pydvl_lissa(ctx: PeerContext, params: dict) -> Solved:
    from pydvl.influence.torch import LissaInfluence

    torch.manual_seed(0)
    return _pydvl(ctx, params, lambda m: LissaInfluence(m, F.cross_entropy, regularization=_regularization(ctx),
                                                         maxiter=params["depth"], scale=params["scale"], rtol=params.get("rtol", 0.0),
                                                         warn_on_max_iteration=False))


def pydvl_arnoldi(ctx: PeerContext, params: dict) -> Solved:
    from pydvl.influence.torch import ArnoldiInfluence

    return _pydvl(ctx, params, lambda m: ArnoldiInfluence(m, F.cross_entropy, regularization=_regularization(ctx),
                                                           rank=params["rank"], krylov_dimension=params.get("krylov_dim")))


def pydvl_ekfac(ctx: PeerContext, params: dict) -> Solved:
    from pydvl.influence.torch import EkfacInfluence

    return _pydvl(ctx, params, lambda m: EkfacInfluence(m, update_diagonal=params.get("update_diagonal", True),
                                                         hessian_regularization=_regularization(ctx)))


def pydvl_datainf(ctx: PeerContext, params: dict) -> Solved:
    """``InverseHarmonicMeanInfluence`` (DataInf), per-layer blocks (pyDVL's ``BlockMode.LAYER_WISE``) or one block."""
    from pydvl.influence.torch import BlockMode, InverseHarmonicMeanInfluence

    mode = BlockMode.LAYER_WISE if params.get("per_layer") else BlockMode.FULL
    return _pydvl(ctx, params, lambda m: InverseHarmonicMeanInfluence(m, F.cross_entropy, regularization=params["regularization"],
                                                                       block_structure=mode))


# -- Captum 0.9.0 (captum.influence) -----------------------------------------------------------------------------------
def captum_arnoldi(ctx: PeerContext, params: dict) -> Solved:
    """``ArnoldiInfluenceFunction``: Krylov basis of ``arnoldi_dim`` HVPs, top ``projection_dim`` eigenpairs, H^-1 ~ R R^T.

    s = R R^T g_test from its factors ``R`` (per-parameter tuples); native = ``influence((x_test, y_test))``.
    """
    from captum.influence._core.arnoldi_influence_function import ArnoldiInfluenceFunction

    model = _model_copy(ctx)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "model.pt"
        torch.save(model.state_dict(), checkpoint)
        influence = ArnoldiInfluenceFunction(
            model, _loader(ctx, params["batch_size"]), str(checkpoint), loss_fn=nn.CrossEntropyLoss(reduction="none"),
            batch_size=params["batch_size"], projection_dim=params["projection_dim"], arnoldi_dim=params["arnoldi_dim"],
            hessian_reg=params.get("hessian_reg", _regularization(ctx)), seed=0)
    factors = torch.stack([_flat_parameters(vector) for vector in influence.R])  # R: k tuples of per-parameter tensors -> (k, p)
    g = ctx.test_gradient()
    ihvp = factors.T @ (factors @ g)

    def native() -> torch.Tensor:
        return influence.influence((ctx.test[0], ctx.test[1]))[0, :CONVENTION_POINTS].detach()

    return Solved(ihvp=ihvp, native=native, notes={"rank": int(factors.shape[0])})


# -- kronfluence 1.0.1 -------------------------------------------------------------------------------------------------
def kronfluence_ekfac(ctx: PeerContext, params: dict) -> Solved:
    """EK-FAC (or K-FAC) factors on the training set, then pairwise scores of test against all n training points.

    Train loss: summed CE with labels sampled from the model (kronfluence's true Fisher) for the factors;
    measurement: CE of the test point. damping_factor = wd + damping. kronfluence returns only scores, so
    the row's time includes the scores of all n points. Its scores are <(G + lambda)^-1 g_test, g_i>, i.e.
    I_up,loss = -(score) (checked by ``native``).
    """
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    class Classification(Task):
        def compute_train_loss(self, batch, model, sample=False):
            inputs, labels = batch
            logits = model(inputs)
            if sample:
                with torch.no_grad():
                    labels = torch.multinomial(F.softmax(logits, dim=-1), 1).flatten()
            return F.cross_entropy(logits, labels, reduction="sum")

        def compute_measurement(self, batch, model):
            inputs, labels = batch
            return F.cross_entropy(model(inputs), labels, reduction="sum")

    torch.manual_seed(0)
    task = Classification()
    model = prepare_model(_model_copy(ctx), task)
    dtype = ctx.dtype
    with tempfile.TemporaryDirectory() as tmp:
        analyzer = Analyzer("peers", model=model, task=task, cpu=True, disable_tqdm=True, output_dir=tmp)
        train, query = TensorDataset(ctx.x, ctx.y), TensorDataset(*ctx.test)
        factor_args = FactorArguments(strategy=params["strategy"], use_empirical_fisher=params.get("empirical", False),
                                      activation_covariance_dtype=dtype, gradient_covariance_dtype=dtype,
                                      per_sample_gradient_dtype=dtype, lambda_dtype=dtype)
        analyzer.fit_all_factors("f", dataset=train, per_device_batch_size=params["batch_size"], factor_args=factor_args,
                                 overwrite_output_dir=True)
        score_args = ScoreArguments(damping_factor=_regularization(ctx), per_sample_gradient_dtype=dtype,
                                    precondition_dtype=dtype, score_dtype=dtype)
        analyzer.compute_pairwise_scores("s", factors_name="f", query_dataset=query, train_dataset=train,
                                         per_device_query_batch_size=1, per_device_train_batch_size=params["batch_size"],
                                         score_args=score_args, overwrite_output_dir=True)
        scores = analyzer.load_pairwise_scores("s")["all_modules"][0].detach().clone()
    return Solved(influence=-scores, native=lambda: scores[:CONVENTION_POINTS])


ROWS: dict[tuple[str, str], Callable[[PeerContext, dict], Solved]] = {
    ("influencekit", "any"): influencekit,
    ("dattri", "cg"): dattri_cg,
    ("dattri", "lissa"): dattri_lissa,
    ("dattri", "arnoldi"): dattri_arnoldi,
    ("pydvl", "cg"): pydvl_cg,
    ("pydvl", "lissa"): pydvl_lissa,
    ("pydvl", "arnoldi"): pydvl_arnoldi,
    ("pydvl", "ekfac"): pydvl_ekfac,
    ("pydvl", "datainf"): pydvl_datainf,
    ("captum", "arnoldi"): captum_arnoldi,
    ("kronfluence", "ekfac"): kronfluence_ekfac,
}
