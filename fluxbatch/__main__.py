from __future__ import annotations

import sys

from fluxbatch.main import main

sys.exit(main())
