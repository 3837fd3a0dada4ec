"""``python -m app``: the ``maglens`` command line."""
from app.cli import main

raise SystemExit(main())
