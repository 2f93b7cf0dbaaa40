"""`python -m bench` runs the whole benchmark."""

import sys

from bench.run import main

sys.exit(main())
