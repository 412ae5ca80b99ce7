"""The ``mmcore`` command line (typer). Entry point: `mmcore.cli.app.main`; see docs/cli.md.

Importing this package imports no torch; each command imports what it needs when it runs.
"""

from __future__ import annotations
