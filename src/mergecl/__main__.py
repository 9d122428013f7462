from mergecl.cli import program

program()
