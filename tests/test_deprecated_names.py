"""The names before the reorganisation still work for one release, each with a DeprecationWarning naming the new one."""

import importlib
import sys

import pytest

import influencekit as ik

MOVED_MODULES = {
    "influencekit.objective": "influencekit.objectives.base",
    "influencekit.torch_objective": "influencekit.objectives.torch_objective",
    "influencekit.models.softmax_regression": "influencekit.objectives.softmax_regression",
    "influencekit.influence": "influencekit.scores.influence",
    "influencekit.perturbation": "influencekit.scores.perturbation",
    "influencekit.fastif": "influencekit.scores.fastif",
    "influencekit.parallel_stest": "influencekit.solvers.parallel_lissa",
    "influencekit.tracin.index": "influencekit.search.faiss_index",
    "influencekit.tracin.factor_index": "influencekit.search.factor_index",
}

RENAMED = {
    "ConjugateGradient": ik.CGSolver,
    "BlockConjugateGradient": ik.BlockCGSolver,
    "LiSSA": ik.LiSSASolver,
    "ParallelLiSSA": ik.ParallelLiSSASolver,
    "IHVPSolver": ik.Solver,
}


@pytest.mark.parametrize("old, new", sorted(MOVED_MODULES.items()))
def test_old_module_path_is_the_new_module_with_a_warning(old, new):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=new.replace(".", r"\.")):
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)


@pytest.mark.parametrize("old, new", sorted(RENAMED.items(), key=lambda item: item[0]))
def test_old_class_name_is_the_new_class_with_a_warning(old, new):
    for package in (ik, ik.solvers):
        with pytest.warns(DeprecationWarning, match=new.__name__):
            assert getattr(package, old) is new


def test_every_solver_is_exported_at_the_top_and_takes_damping_keyword_only():
    import inspect

    for name in ik.solvers.__all__:
        assert getattr(ik, name) is getattr(ik.solvers, name)
        solver = getattr(ik.solvers, name)
        if inspect.isclass(solver) and issubclass(solver, ik.Solver) and solver is not ik.Solver:
            parameters = list(inspect.signature(solver.__init__).parameters.values())[1:]
            assert parameters[0].name == "curvature", name
            # after the curvature, keyword-only (or passed on as **settings to a base with keyword-only damping)
            kinds = {p.kind for p in parameters[1:]}
            assert kinds <= {inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.VAR_KEYWORD}, name
            if inspect.Parameter.VAR_KEYWORD not in kinds:
                assert "damping" in {p.name for p in parameters}, name
