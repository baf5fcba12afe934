"""The exceptions influencekit raises for input that would otherwise give a silently wrong answer.

Every one is a :class:`InfluenceInputError`, itself a :class:`ValueError`, so a
caller (the CLI) can map the whole family to one exit status. Each message is
one line naming the problem, where it is (example index, parameter name, batch)
and the fix. README.md, section "What bad input gets", lists them all.
"""

from __future__ import annotations


__all__ = [
    "DtypeCastWarning",
    "DtypeError",
    "EmptyDataError",
    "InfluenceInputError",
    "LabelRangeError",
    "NonFiniteError",
    "NonSequentialSamplerError",
    "NondeterministicDataError",
    "TrainModeError",
    "UnconvergedSolveError",
    "UnconvergedSolveWarning",
]


class InfluenceInputError(ValueError):
    """Base class: the input would make the influence scores meaningless."""


class NonFiniteError(InfluenceInputError):
    """A NaN or infinity in data, targets, parameters, gradients or a solve."""


class EmptyDataError(InfluenceInputError):
    """The training data or the test batch has no examples."""


class LabelRangeError(InfluenceInputError):
    """A class label outside [0, number of classes) for a classification loss."""


class TrainModeError(InfluenceInputError):
    """The model is in train mode and has modules (dropout, batch norm) that make it random or batch-dependent."""


class DtypeError(InfluenceInputError):
    """The attributed parameters do not share one floating dtype."""


class NonSequentialSamplerError(InfluenceInputError):
    """A DataLoader whose sampler does not visit the examples in their stored order."""


class NondeterministicDataError(InfluenceInputError):
    """A data source whose batches differ between passes (e.g. random augmentation)."""


class UnconvergedSolveError(InfluenceInputError):
    """An iterative iHVP solve stopped before reaching its tolerance."""


class UnconvergedSolveWarning(UserWarning):
    """Issued instead of :class:`UnconvergedSolveError` when the caller accepts unconverged solves."""


class DtypeCastWarning(UserWarning):
    """Floating data is cast to a lower-precision parameter dtype."""
