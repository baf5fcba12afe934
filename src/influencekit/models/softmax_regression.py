"""Deprecated: moved to :mod:`influencekit.objectives.softmax_regression` (this alias stays for one release)."""

from influencekit._deprecation import moved_module

moved_module(__name__, "influencekit.objectives.softmax_regression")
