"""``python -m pertadapt.cli``."""

from pertadapt.cli.main import main

main()
