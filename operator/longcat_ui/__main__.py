"""`python -m longcat_ui`: `longcat-i2v serve` where the operator's CLI is not installed (the trainer image)."""

import sys

from .serve import main

sys.exit(main())
