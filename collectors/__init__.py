"""Readers of the node: kernel log sources, parsers and periodic collectors.

Parsing modules are pure (text in, dataclasses out); I/O modules take injectable
paths, file objects and callables so tests can point them at fixture trees.
This package never imports from ``agent``.
"""
