from refstorage.cli import main

main()
