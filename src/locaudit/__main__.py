"""`python -m locaudit ...` runs the `locaudit` command (cli/main.py)."""

from locaudit.cli.main import main

if __name__ == "__main__":
    main()
