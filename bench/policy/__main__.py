"""Entry point for ``python -m bench.policy``."""

from bench.policy.run import main

raise SystemExit(main())
