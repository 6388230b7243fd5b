"""Entry point for ``python -m bench.maglev``."""

from bench.maglev.run import main

raise SystemExit(main())
