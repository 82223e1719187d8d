"""`python -m sv2v_core translate|metrics ...` — see sv2v_core/cli.py."""

from sv2v_core.cli import main

raise SystemExit(main())
