"""influencekit: which training examples made my model predict this?

Data flows one way, and so do the packages:

1. data (:class:`DataSource`) and 2. the objective (:mod:`influencekit.objectives`:
   model + loss + data -> gradients);
3. curvature operators (:mod:`influencekit.curvature`);
4. iHVP solvers (:mod:`influencekit.solvers`, one contract: ``Solver(curvature, *, damping=...)``);
5. scores (:mod:`influencekit.scores`: influence, perturbation, FastIF), TracIn
   (:mod:`influencekit.tracin`) and nearest-neighbour search (:mod:`influencekit.search`);
6. validation by retraining (:mod:`influencekit.validation`), experiments and the CLI.

Every solver, curvature and score type is importable from here (``import influencekit as ik``).
"""

from influencekit import curvature, errors, objectives, scores, search, solvers
from influencekit._deprecation import alias_getattr
from influencekit.curvature import *  # noqa: F403
from influencekit.data import DataSource
from influencekit.errors import *  # noqa: F403
from influencekit.objectives import *  # noqa: F403
from influencekit.scores import *  # noqa: F403
from influencekit.search import *  # noqa: F403
from influencekit.solvers import *  # noqa: F403
from influencekit.tracin import LastLayerTracIn, TracInCP

__all__ = sorted(
    {"DataSource", "LastLayerTracIn", "TracInCP"}
    | set(errors.__all__) | set(curvature.__all__) | set(objectives.__all__) | set(scores.__all__) | set(search.__all__) | set(solvers.__all__)
)

__getattr__ = alias_getattr(__name__, solvers.DEPRECATED_NAMES)
