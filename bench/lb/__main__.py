"""Entry point for ``python -m bench.lb``."""

from bench.lb.run import main

raise SystemExit(main())
