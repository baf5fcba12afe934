"""Stages 1-2 of the data flow, model + loss + data -> gradients: the regularised training objective
R(theta) = (1/n) sum_i l_i(theta) + (lambda/2) ||theta||^2 at the trained parameters, with its
per-example training gradients, test (measurement) gradients and Hessian-vector products.

* :class:`Objective` -- the protocol everything downstream uses.
* :class:`TorchObjective` -- any ``nn.Module`` and per-example loss, through ``torch.func``.
* :class:`SoftmaxRegressionObjective` -- closed forms for multinomial logistic regression
  (the Koh & Liang Figure 2 model), tested against the generic path.
"""

from influencekit.objectives.base import Objective
from influencekit.objectives.softmax_regression import SoftmaxFit, SoftmaxRegressionObjective, fit_softmax_regression
from influencekit.objectives.torch_objective import TorchObjective

__all__ = ["Objective", "SoftmaxFit", "SoftmaxRegressionObjective", "TorchObjective", "fit_softmax_regression"]
