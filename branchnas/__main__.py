"""``python -m branchnas`` runs the command line."""

from branchnas_cli.main import main

if __name__ == "__main__":
    main()
