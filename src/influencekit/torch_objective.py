"""Deprecated: moved to :mod:`influencekit.objectives.torch_objective` (this alias stays for one release)."""

from influencekit._deprecation import moved_module

moved_module(__name__, "influencekit.objectives.torch_objective")
