from medldm.cli import main

main()
