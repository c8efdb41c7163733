"""`python -m depthd`: the same as the `depthd` command."""

from depthd.ops.cli import main

raise SystemExit(main())
