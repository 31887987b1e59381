"""`python -m benchmarks.photos prepare|report` (see `benchmarks.photos.cli`)."""
import sys

from benchmarks.photos import cli

sys.exit(cli.main())
