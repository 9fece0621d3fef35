"""``python -m bml_pipeline`` runs the CLI."""

import sys

from bml_pipeline.cli import main

sys.exit(main())
