"""Deprecated: the closed-form models moved to :mod:`influencekit.objectives`."""
