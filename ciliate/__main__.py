from ciliate.cli.main import main

main()
