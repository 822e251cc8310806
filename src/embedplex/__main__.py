from embedplex.cli import main

main()
