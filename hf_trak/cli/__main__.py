"""``python -m hf_trak.cli``: the ``hf-trak`` command."""

import sys

from hf_trak.cli import main

sys.exit(main())
