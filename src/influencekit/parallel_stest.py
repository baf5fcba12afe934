"""Deprecated: moved to :mod:`influencekit.solvers.parallel_lissa` (this alias stays for one release)."""

from influencekit._deprecation import moved_module

moved_module(__name__, "influencekit.solvers.parallel_lissa")
