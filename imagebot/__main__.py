"""`python -m imagebot` runs the bot."""

from imagebot.cli import main

raise SystemExit(main())
