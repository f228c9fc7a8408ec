"""Lets TFDS 4.9.10 prepare datasets defined outside its own package.

It imports the `importlib_resources` backport for that, but declares the dependency only for
Python < 3.9; the standard library's `importlib.resources` is the same API. A real backport, if
installed, wins.
"""
import importlib.resources.abc
import sys

sys.modules.setdefault("importlib_resources", importlib.resources)
