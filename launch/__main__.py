from tlaunch.cli import program

program()
