"""nodediag agent: CLI, settings, main loop and sinks.

Imports from ``collectors``, never the reverse.
"""

__version__ = "0.1.0"
