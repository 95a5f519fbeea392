"""`python -m node`: the same entry point as the `node` and `coop` commands."""

from node.cli import main

raise SystemExit(main())
