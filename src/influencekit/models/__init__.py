"""Model definitions the experiments train, and fitting a network to a verified optimum (stage 0 of the data flow).

The closed-form softmax regression moved to :mod:`influencekit.objectives` (its old path here still works,
with a DeprecationWarning).
"""
