"""Entry point for ``python -m bench.datapath``."""

from bench.datapath.run import main

raise SystemExit(main())
