"""``python -m hypervisor.cli`` runs the ``omega`` command."""

import sys

from hypervisor.cli import main

sys.exit(main())
