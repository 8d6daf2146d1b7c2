"""`python -m ipag …`: the command line (see `ipag.cli`)."""

from .cli import main

raise SystemExit(main())
