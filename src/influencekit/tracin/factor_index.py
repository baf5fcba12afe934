"""Deprecated: moved to :mod:`influencekit.search.factor_index` (this alias stays for one release)."""

from influencekit._deprecation import moved_module

moved_module(__name__, "influencekit.search.factor_index")
