from bench.l7.run import main

main()
