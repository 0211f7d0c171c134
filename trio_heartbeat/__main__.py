"""``python -m trio_heartbeat``: see :mod:`trio_heartbeat._cli`."""

import sys

from ._cli import main

sys.exit(main())
