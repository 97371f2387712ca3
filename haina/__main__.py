"""`python -m haina …`: the same as the `haina` command (torchrun starts each rank this way)."""

from haina.cli import main

raise SystemExit(main())
