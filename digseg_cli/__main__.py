"""``python -m digseg_cli`` runs the same command line as ``digseg``."""

from digseg_cli.cli.entry import main

if __name__ == "__main__":
    main()
