"""Deprecated: moved to :mod:`influencekit.search.faiss_index` (this alias stays for one release)."""

from influencekit._deprecation import moved_module

moved_module(__name__, "influencekit.search.faiss_index")
