from dynres.cli import main

main()
