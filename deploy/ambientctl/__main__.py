"""``python -m deploy.ambientctl``."""

import sys

from deploy.ambientctl import main

sys.exit(main())
