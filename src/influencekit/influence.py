"""Deprecated: moved to :mod:`influencekit.scores.influence` (this alias stays for one release)."""

from influencekit._deprecation import moved_module

moved_module(__name__, "influencekit.scores.influence")
