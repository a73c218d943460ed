"""`python -m voxd` runs the command line."""

from voxd.cli import main

raise SystemExit(main())
