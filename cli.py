"""`python cli.py ...` in a source checkout: the same commands as the installed `dlmtrt` console script."""
from dlmtrt.cli import main

if __name__ == "__main__":
    main()
