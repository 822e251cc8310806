from embedplex.cli.main import main

main()
