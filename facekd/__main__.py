"""``python -m facekd`` is the same as the ``facekd`` console command."""

from facekd.cli import main

raise SystemExit(main())
