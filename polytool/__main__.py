"""`python -m polytool ...`: the same CLI as the `polytool` command (for environments without the script)."""
from polytool.cli import main

if __name__ == "__main__":
    main(prog_name="polytool")
